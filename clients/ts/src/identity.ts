/**
 * Identities, as Python's `protocol/identity.py`: an Ed25519 key to sign with and an X25519 key
 * to be sealed to — two keys, not one converted into the other, so signing and encryption never
 * share key material. A public identity travels as one string, `gridq1:<base64url of 64 bytes>`
 * (verify key ‖ box key); a secret key file is JSON `{name, signing_key, box_secret, public_key}`
 * with the two 32-byte secrets in URL-safe base64 — the files `gridq keys new` writes.
 *
 *     await ready();
 *     const me = Identity.fromJson(keyFileText);   // or Identity.generate("alice")
 *     me.public.text();                           // "gridq1:…", for a node's [users]
 */
import { b64url, concat, randomBytes, unb64url } from "./bytes.js";
import { BadSignature, InvalidRequest } from "./errors.js";
import { sodium } from "./sodium.js";

export const KEY_PREFIX = "gridq1:";
/** What an envelope's sender or recipient may be called. */
export const NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** What everyone may know about a participant: its name and its two public keys. */
export class PublicIdentity {
  constructor(
    readonly name: string,
    readonly verifyKey: Uint8Array,
    readonly boxKey: Uint8Array,
  ) {
    if (verifyKey.length !== 32 || boxKey.length !== 32) throw new InvalidRequest("public keys are 32 bytes each");
  }

  /** A `gridq1:…` key text, as given in node configs and `NAME.pub` files. */
  static parse(name: string, text: string): PublicIdentity {
    if (!text.startsWith(KEY_PREFIX)) throw new InvalidRequest(`public key of '${name}' must start with '${KEY_PREFIX}'`);
    const raw = unb64url(text.slice(KEY_PREFIX.length), `public key of '${name}'`);
    if (raw.length !== 64) throw new InvalidRequest(`public key of '${name}' must hold 64 bytes, not ${raw.length}`);
    return new PublicIdentity(name, raw.slice(0, 32), raw.slice(32));
  }

  text(): string {
    return KEY_PREFIX + b64url(concat(this.verifyKey, this.boxKey));
  }

  /** BadSignature unless `signature` is this identity's Ed25519 signature of `message`. */
  verify(message: Uint8Array, signature: Uint8Array): void {
    let ok = false;
    try {
      ok = signature.length === 64 && sodium().crypto_sign_verify_detached(signature, message, this.verifyKey);
    } catch {
      ok = false;
    }
    if (!ok) throw new BadSignature(`signature does not match the key of '${this.name}'`);
  }

  /** Encrypt so that only this identity can read it (anonymous sender, X25519 sealed box). */
  seal(plaintext: Uint8Array): Uint8Array {
    return sodium().crypto_box_seal(plaintext, this.boxKey);
  }
}

/** A participant's secret keys. Keep them in a file (or storage) only its owner can read. */
export class Identity {
  private readonly signingSecret: Uint8Array; // libsodium's 64-byte form: seed ‖ public key
  readonly public: PublicIdentity;

  /** `signingKey`: the 32-byte Ed25519 seed (PyNaCl's `bytes(SigningKey)`); `boxSecret`: the
   * 32-byte X25519 secret (`bytes(PrivateKey)`). */
  constructor(
    readonly name: string,
    readonly signingKey: Uint8Array,
    readonly boxSecret: Uint8Array,
  ) {
    if (signingKey.length !== 32 || boxSecret.length !== 32) {
      throw new InvalidRequest("not a gridq key: a name and two 32-byte keys are needed");
    }
    const s = sodium();
    const pair = s.crypto_sign_seed_keypair(signingKey);
    this.signingSecret = pair.privateKey;
    this.public = new PublicIdentity(name, pair.publicKey, s.crypto_scalarmult_base(boxSecret));
  }

  static generate(name: string): Identity {
    return new Identity(name, randomBytes(32), randomBytes(32));
  }

  sign(message: Uint8Array): Uint8Array {
    return sodium().crypto_sign_detached(message, this.signingSecret);
  }

  /** Open a sealed box sealed to this identity; BadSignature if it was not (or was altered). */
  unseal(ciphertext: Uint8Array): Uint8Array {
    try {
      return sodium().crypto_box_seal_open(ciphertext, this.public.boxKey, this.boxSecret);
    } catch {
      throw new BadSignature(`sealed value cannot be opened with the key of '${this.name}'`);
    }
  }

  /** The secret key file's content, as Python's `Identity.to_json` writes it. */
  toJson(): string {
    return JSON.stringify(
      {
        name: this.name,
        signing_key: b64url(this.signingKey),
        box_secret: b64url(this.boxSecret),
        public_key: this.public.text(),
      },
      null,
      2,
    );
  }

  /** The identity in a secret key file's text (`$GRIDQ_HOME/keys/NAME.key`). */
  static fromJson(text: string): Identity {
    if (text.trimStart().startsWith(KEY_PREFIX)) {
      throw new InvalidRequest(
        "this is a public key (a NAME.pub file), which cannot sign: an identity is the secret key file NAME.key " +
          "that `gridq keys new` wrote next to it",
      );
    }
    let data: unknown;
    try {
      data = JSON.parse(text);
    } catch (exc) {
      throw new InvalidRequest(`not a gridq key file: ${String(exc)}`);
    }
    const record = (typeof data === "object" && data !== null ? data : {}) as Record<string, unknown>;
    const { name, signing_key: signing, box_secret: box } = record;
    if (typeof name !== "string" || typeof signing !== "string" || typeof box !== "string") {
      throw new InvalidRequest("not a gridq key file: a name and two 32-byte keys are needed");
    }
    return new Identity(name, unb64url(signing, "signing_key"), unb64url(box, "box_secret"));
  }
}
