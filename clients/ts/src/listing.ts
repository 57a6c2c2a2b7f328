/**
 * The gateway's signed listing of the registered nodes and their keys (Python's
 * `protocol/listing.py`): how this client learns the key each node signs its replies with.
 * The edge hands it over as posted; only the gateway's key (pinned or trusted on first use)
 * decides whether it is believed, and only while it is recent and not older than one already read.
 */
import { unhex } from "./bytes.js";
import { CLOCK_SKEW_SECONDS, isRecord } from "./envelope.js";
import { BadSignature, InvalidRequest, StaleMessage } from "./errors.js";
import { PublicIdentity } from "./identity.js";
import { pyDumps, utf8 } from "./pyjson.js";

export const LISTING_EVERY_SECONDS = 10;
export const LISTING_MAX_AGE_SECONDS = 60;

export interface NodeInfo {
  readonly node: string;
  readonly public_key: string;
  readonly queue: string;
  readonly last_seen: number;
}

export interface NodeListing {
  readonly issued_at: number;
  readonly nodes: readonly NodeInfo[];
}

/** The bytes the gateway signs: `json.dumps({"gridq": "node-listing", "listing": text})`. */
export function listingSignedPart(text: string): Uint8Array {
  return utf8(pyDumps({ gridq: "node-listing", listing: text }));
}

export interface OpenListingOptions {
  now: number;
  /** The issue time of the last listing accepted: an older one is a copy put back. */
  newerThan?: number;
  maxAge?: number;
}

/** The listing `posted` (the string the gateway posted), if `gateway` signed it and it is fresh. */
export function openListing(posted: string, gateway: PublicIdentity, options: OpenListingOptions): NodeListing {
  let outer: unknown;
  try {
    outer = JSON.parse(posted);
  } catch {
    outer = undefined;
  }
  if (!isRecord(outer) || typeof outer["listing"] !== "string" || typeof outer["signature"] !== "string" ||
    !/^[0-9a-f]{128}$/.test(outer["signature"]) || Object.keys(outer).some((k) => k !== "listing" && k !== "signature")) {
    throw new InvalidRequest("the node listing is not the gateway's format");
  }
  const text = outer["listing"];
  gateway.verify(listingSignedPart(text), unhex(outer["signature"]));
  const listing = parseListing(text);
  const at = options.now;
  if (listing.issued_at > at + CLOCK_SKEW_SECONDS) {
    throw new StaleMessage(`the node listing is dated ${(listing.issued_at - at).toFixed(0)} s in the future: check the clocks`);
  }
  const maxAge = options.maxAge ?? LISTING_MAX_AGE_SECONDS;
  if (at - listing.issued_at > maxAge) {
    throw new StaleMessage(
      `the gateway's node listing is ${(at - listing.issued_at).toFixed(0)} s old (it is posted every ` +
        `${LISTING_EVERY_SECONDS} s): is the gateway running?`,
    );
  }
  if (listing.issued_at < (options.newerThan ?? 0)) {
    throw new StaleMessage("the node listing is older than one this client has read: an old copy was put back");
  }
  return listing;
}

/** The nodes' keys of a verified listing (or of a gateway reply's `nodes`). */
export function nodeKeys(nodes: readonly NodeInfo[]): Map<string, PublicIdentity> {
  return new Map(nodes.map((n) => [n.node, PublicIdentity.parse(n.node, n.public_key)]));
}

function parseListing(text: string): NodeListing {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    data = undefined;
  }
  if (!isRecord(data) || typeof data["issued_at"] !== "number" || !Array.isArray(data["nodes"]) ||
    !data["nodes"].every(isNodeInfo)) {
    // signed by the gateway, yet not a listing: a gateway of another version
    throw new BadSignature("the gateway signed a node listing this client cannot read; is the client of this gridq version?");
  }
  return data as unknown as NodeListing;
}

export function isNodeInfo(value: unknown): value is NodeInfo {
  return isRecord(value) && typeof value["node"] === "string" && typeof value["public_key"] === "string" &&
    typeof value["queue"] === "string" && typeof value["last_seen"] === "number";
}
