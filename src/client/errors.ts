/**
 * Errors of the snapshot metadata client. The codes a retry cannot fix come back as their own class with a
 * message that says what to do; cut streams (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED) are resumed by the
 * client and only surface as RetriesExhaustedError when the driver stays away.
 */
import { Code, ConnectError } from '@connectrpc/connect';

/** The gRPC status names the client distinguishes. */
export type MetadataErrorCode =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'PERMISSION_DENIED'
  | 'UNAUTHENTICATED'
  | 'FAILED_PRECONDITION'
  | 'OUT_OF_RANGE'
  | 'UNAVAILABLE'
  | 'INTERNAL'
  | 'PROTOCOL'
  | 'OTHER';

/** Any failure of a metadata listing. `driverMessage` is the driver's own status message. */
export class SnapshotMetadataError extends Error {
  constructor(
    readonly code: MetadataErrorCode,
    message: string,
    readonly driverMessage: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The request is malformed: a missing ID, a base and target of different volumes or in the wrong order. */
export class InvalidArgumentError extends SnapshotMetadataError {}
/** A snapshot does not exist (deleted, or a typo). */
export class NotFoundError extends SnapshotMetadataError {}
/** The caller is known but not allowed (Kubernetes RBAC). */
export class PermissionDeniedError extends SnapshotMetadataError {}
/** The caller's credentials were not accepted (token expired or of the wrong audience). */
export class UnauthenticatedError extends SnapshotMetadataError {}
/** The driver cannot answer a delta from this base any more: take a full backup. */
export class FailedPreconditionError extends SnapshotMetadataError {}
/** starting_offset lies beyond the snapshot's capacity. */
export class OutOfRangeError extends SnapshotMetadataError {}
/** The stream kept being cut after every retry the client allows. */
export class RetriesExhaustedError extends SnapshotMetadataError {}
/** The driver's answer broke the protocol (extents out of order, a zero length, a changing capacity). */
export class ProtocolError extends SnapshotMetadataError {}

/** An endpoint string that names no socket (another scheme, an empty path): the caller's to fix. */
export class EndpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EndpointError';
  }
}

/** Codes worth a retry: the stream was cut, or the driver is (re)starting. */
const RESUMABLE = new Set<Code>([Code.Unavailable, Code.Canceled, Code.DeadlineExceeded]);

export function isResumable(err: unknown): boolean {
  return err instanceof ConnectError && RESUMABLE.has(err.code);
}

/** The typed error for a status that a retry will not fix; `what` names the request, e.g. "delta(a, b)". */
export function typedError(err: unknown, what: string): SnapshotMetadataError {
  if (err instanceof SnapshotMetadataError) return err;
  if (!(err instanceof ConnectError)) {
    const text = err instanceof Error ? err.message : String(err);
    return new SnapshotMetadataError('OTHER', `${what}: ${text}`, text, { cause: err });
  }
  const m = err.rawMessage;
  switch (err.code) {
    case Code.InvalidArgument:
      return new InvalidArgumentError(
        'INVALID_ARGUMENT',
        `${what} was refused as invalid: ${m} (check the snapshot IDs: a delta needs an older base and a newer target of the same volume)`,
        m,
        { cause: err },
      );
    case Code.NotFound:
      return new NotFoundError(
        'NOT_FOUND',
        `${what}: a snapshot does not exist: ${m} (check the ID; a deleted snapshot cannot be listed)`,
        m,
        { cause: err },
      );
    case Code.PermissionDenied:
      return new PermissionDeniedError(
        'PERMISSION_DENIED',
        `${what}: permission denied: ${m} (the caller's ServiceAccount needs the backup-client role)`,
        m,
        { cause: err },
      );
    case Code.Unauthenticated:
      return new UnauthenticatedError(
        'UNAUTHENTICATED',
        `${what}: not authenticated: ${m} (get a fresh token for the sidecar's audience)`,
        m,
        { cause: err },
      );
    case Code.FailedPrecondition:
      // CSI 1.12 drivers (and our fault injector) may already say it: the advice is given once.
      return new FailedPreconditionError(
        'FAILED_PRECONDITION',
        `${what}: the driver cannot answer from this base: ${m}${/take a full backup/i.test(m) ? '' : ' (take a full backup)'}`,
        m,
        { cause: err },
      );
    case Code.OutOfRange:
      return new OutOfRangeError('OUT_OF_RANGE', `${what}: the starting offset is beyond the snapshot: ${m}`, m, {
        cause: err,
      });
    case Code.Unavailable:
    case Code.Canceled:
    case Code.DeadlineExceeded:
      return new RetriesExhaustedError(
        'UNAVAILABLE',
        `${what}: the driver stayed unreachable after every retry: ${m} (is it running? is the endpoint right?)`,
        m,
        { cause: err },
      );
    case Code.Internal:
      return new SnapshotMetadataError('INTERNAL', `${what}: the driver failed: ${m} (see its log)`, m, { cause: err });
    default:
      return new SnapshotMetadataError('OTHER', `${what}: ${Code[err.code]}: ${m}`, m, { cause: err });
  }
}
