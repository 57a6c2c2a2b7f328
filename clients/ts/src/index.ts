/**
 * @gridq/client — the gridq data scientist's client for Node 20 and browsers, through the
 * grid's HTTP edge. See README.md; `Grid.connect` is where to start.
 */
export { ready } from "./sodium.js";
export { Identity, PublicIdentity, KEY_PREFIX } from "./identity.js";
export * from "./errors.js";
export {
  type Envelope, type NonceStore, type OpenOptions, type SealOptions, MemoryNonceStore, PROTOCOL_VERSION,
  MAX_BODY_CHARS, MAX_TTL_SECONDS, CLOCK_SKEW_SECONDS, DEFAULT_TTL_SECONDS, sealEnvelope, openEnvelope, signedBytes,
  bodyJson,
} from "./envelope.js";
export { float, PyFloat, type PyJson, pyDumps, pyFloatRepr, pyString } from "./pyjson.js";
export {
  type SealedValue, CLAIM_CHECK_PREFIX, CLAIM_CHECK_THRESHOLD, openSealedValue, sealSigned, openSigned, sha256Hex,
  blake2b256,
} from "./seal.js";
export { Tensor, tensor, type DType, DTYPES, type Nested, type Scalar } from "./tensor.js";
export { encodeTensor, decodeTensor, pack, unpack, MAX_ELEMENTS } from "./codec.js";
export { type NodeInfo, type NodeListing, openListing, LISTING_MAX_AGE_SECONDS } from "./listing.js";
export type {
  BudgetInfo, DatasetMeta, JobReply, NoiseInfo, PointerTicket, Release, RequestInfo, RequestStatus, SealedMetrics, SearchQuery,
  WireError,
} from "./messages.js";
export { REQUEST_STATUSES } from "./messages.js";
export { cancellation, cancelledBy, signer as cancellationSigner, STARTED as CANCEL_STARTED } from "./cancel.js";
export { type CancelAnswer, Edge, type EdgeOptions, type JobAnswer, MAX_WAIT_SECONDS } from "./edge.js";
export {
  Expression, DataPointer, cat, stack, slice, planJson, type Plan, type Step, type InputRef, type TensorSpec,
  type Constant, type Operand, type IndexItem, type Slice,
} from "./pointers.js";
export { JobTicket, PrivateValue } from "./ticket.js";
export { type GatewayPins, MemoryPins, fingerprint } from "./pins.js";
export { Grid, type ConnectOptions, type RequestList, REQUESTS_WAIT_SECONDS, type SearchOptions, Tasks, GATEWAY } from "./grid.js";
export {
  FixedPoint, share, reconstruct, type ModelCard, type Query, cardDigest, canonicalCard, verifySignedCard, queryDigest,
  inputLabel,
  outputLabel,
} from "./mpc.js";
