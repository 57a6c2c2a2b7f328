/**
 * The typed errors of gridq, with the same stable wire codes as Python's `protocol/errors.py`.
 *
 *     GridError
 *     ├── AuthenticationError      BadSignature, UnknownSender (NotEnrolled), MessageExpired,
 *     │                            ReplayedNonce, StaleMessage, WrongRecipient, MisdirectedReply,
 *     │                            GatewayKeyChanged, IncompatibleProtocol
 *     ├── PermissionDenied         RequestDenied › RequestExpired (no decision within the node's
 *     │                            [approval] expire_after: send the work again)
 *     ├── ApprovalRequired
 *     ├── BudgetExhausted
 *     ├── InvalidRequest           ForbiddenOperation, SensitivityUnknown, LimitExceeded
 *     ├── NotFound
 *     ├── NodeUnavailable          BrokerUnavailable   (retryable)
 *     ├── CannotCancel             ticket.cancel() of a job that has started or finished
 *     └── JobFailed                JobCancelled (its requester cancelled it before it ran: it never ran)
 *
 * Errors cross the wire as data (`{code, message, job_id}`); {@link errorFromWire} turns the
 * code back into the class, so `catch (e) { if (e instanceof BudgetExhausted) … }` works
 * whether the node, the edge or this client raised it.
 */

export class GridError extends Error {
  /** The stable wire code (the class's own; an unknown code read off the wire keeps its text). */
  readonly code: string;
  readonly jobId: string | undefined;
  /** Whether sending the same request again may succeed (a timeout, not a denial). */
  static readonly retryable: boolean = false;
  static readonly code: string = "grid_error";

  constructor(message: string, options: { jobId?: string | undefined; code?: string } = {}) {
    super(options.jobId === undefined ? message : `${message} (job ${options.jobId})`);
    this.name = new.target.name;
    this.code = options.code ?? (new.target as typeof GridError).code;
    this.jobId = options.jobId;
  }

  get retryable(): boolean {
    return (this.constructor as typeof GridError).retryable;
  }
}

export class AuthenticationError extends GridError { static override readonly code: string = "authentication"; }
export class BadSignature extends AuthenticationError { static override readonly code: string = "bad_signature"; }
export class UnknownSender extends AuthenticationError { static override readonly code: string = "unknown_sender"; }
export class NotEnrolled extends UnknownSender { static override readonly code: string = "not_enrolled"; }
export class MessageExpired extends AuthenticationError { static override readonly code: string = "expired"; }
export class ReplayedNonce extends AuthenticationError { static override readonly code: string = "replayed_nonce"; }
export class StaleMessage extends AuthenticationError { static override readonly code: string = "stale_message"; }
export class WrongRecipient extends AuthenticationError { static override readonly code: string = "wrong_recipient"; }
export class MisdirectedReply extends AuthenticationError {
  static override readonly code: string = "misdirected_reply";
}
export class GatewayKeyChanged extends AuthenticationError {
  static override readonly code: string = "gateway_key_changed";
}
export class IncompatibleProtocol extends AuthenticationError {
  static override readonly code: string = "incompatible_protocol";
}
export class PermissionDenied extends GridError { static override readonly code: string = "permission_denied"; }
export class RequestDenied extends PermissionDenied { static override readonly code: string = "request_denied"; }
/** A request waited in the owner's approval queue longer than the node's `[approval] expire_after`
 * without a decision: it is closed, and never runs. Send the work again (a new job). */
export class RequestExpired extends RequestDenied { static override readonly code: string = "request_expired"; }
export class ApprovalRequired extends GridError { static override readonly code: string = "approval_required"; }
export class BudgetExhausted extends GridError { static override readonly code: string = "budget_exhausted"; }
export class InvalidRequest extends GridError { static override readonly code: string = "invalid_request"; }
export class ForbiddenOperation extends InvalidRequest {
  static override readonly code: string = "forbidden_operation";
}
export class SensitivityUnknown extends InvalidRequest {
  static override readonly code: string = "sensitivity_unknown";
}
export class LimitExceeded extends InvalidRequest { static override readonly code: string = "limit_exceeded"; }
export class NotFound extends GridError { static override readonly code: string = "not_found"; }
export class NodeUnavailable extends GridError {
  static override readonly code: string = "node_unavailable";
  static override readonly retryable: boolean = true;
}
export class BrokerUnavailable extends NodeUnavailable {
  static override readonly code: string = "broker_unavailable";
}
export class JobFailed extends GridError { static override readonly code: string = "job_failed"; }
/** Its requester cancelled the job before its node started it: it never ran, and nothing of it
 * was charged or kept. */
export class JobCancelled extends JobFailed { static override readonly code: string = "job_cancelled"; }
/** `ticket.cancel()` could not cancel the job: its node has started it (a running job is not
 * stopped) or answered it. The message says which, and what to do instead. */
export class CannotCancel extends GridError { static override readonly code: string = "cannot_cancel"; }

const CLASSES: (typeof GridError)[] = [
  GridError, AuthenticationError, BadSignature, UnknownSender, NotEnrolled, MessageExpired, ReplayedNonce,
  StaleMessage, WrongRecipient, MisdirectedReply, GatewayKeyChanged, IncompatibleProtocol, PermissionDenied,
  RequestDenied, RequestExpired, ApprovalRequired, BudgetExhausted, InvalidRequest, ForbiddenOperation,
  SensitivityUnknown, LimitExceeded, NotFound, NodeUnavailable, BrokerUnavailable, CannotCancel, JobFailed, JobCancelled,
];

/** Error classes by wire code. */
export const ERRORS_BY_CODE: ReadonlyMap<string, typeof GridError> = new Map(CLASSES.map((c) => [c.code, c]));

/** The typed error for a wire error `{code, message, job_id}`; an unknown code is a plain GridError
 * that keeps the code it was given. */
export function errorFromWire(data: unknown): GridError {
  const record = (typeof data === "object" && data !== null ? data : {}) as Record<string, unknown>;
  const code = typeof record["code"] === "string" ? record["code"] : "grid_error";
  const message = typeof record["message"] === "string" ? record["message"] : "";
  const jobId = typeof record["job_id"] === "string" ? record["job_id"] : undefined;
  const cls = ERRORS_BY_CODE.get(code);
  return cls === undefined ? new GridError(message, { jobId, code }) : new cls(message, { jobId });
}
