/**
 * libsodium (WebAssembly, via libsodium-wrappers), loaded once. Every signature, sealed box and
 * BLAKE2b digest of this package is libsodium's — the library PyNaCl wraps on the Python side —
 * so both sides accept and refuse the same bytes.
 */
import sodiumModule from "libsodium-wrappers";

export type Sodium = typeof sodiumModule;

let loaded = false;

/** Load libsodium. `Grid.connect` does it; call it yourself before using keys or sealing directly. */
export async function ready(): Promise<void> {
  await sodiumModule.ready;
  loaded = true;
}

/** The loaded library; a clear error (not a libsodium crash) if {@link ready} was not awaited. */
export function sodium(): Sodium {
  if (!loaded) throw new Error("libsodium is not loaded yet: `await ready()` (from @gridq/client) first");
  return sodiumModule;
}
