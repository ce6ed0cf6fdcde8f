/**
 * The one place where errors become gRPC statuses. Services throw engine errors (typed by cause), node
 * data-plane errors (typed by kind), or `rpcError(...)` for protocol-level checks; everything else is an
 * internal error whose details are logged but not sent. Codes are written as `Code.*`, never as numbers.
 */
import type http2 from 'node:http2';
import { Code, ConnectError } from '@connectrpc/connect';
import { EngineError, type EngineErrorCode } from '../../storage-engine/index.js';
import { CommandError } from '../dataplane/command.js';
import { NodeError, type NodeErrorKind, isNoSpace } from '../dataplane/node-errors.js';

/** The engine's refusals, by cause. */
const ENGINE_CODES: Record<EngineErrorCode, Code> = {
  NOT_FOUND: Code.NotFound,
  ALREADY_EXISTS: Code.AlreadyExists,
  INVALID_ARGUMENT: Code.InvalidArgument,
  OUT_OF_RANGE: Code.OutOfRange,
  NO_SPACE: Code.ResourceExhausted,
  BUSY: Code.FailedPrecondition,
  // Snapshots of unrelated volumes, or in the wrong order: the request's arguments are what is wrong.
  UNRELATED: Code.InvalidArgument,
  // CSI 1.12: the plugin cannot compute the delta (the base's change record is gone): take a full backup.
  HISTORY_GONE: Code.FailedPrecondition,
  CLOSED: Code.Unavailable,
};

/** The node data plane's refusals, by kind (a new kind must be given its code here before it compiles). */
export const NODE_CODES: Record<NodeErrorKind, Code> = {
  'invalid-argument': Code.InvalidArgument,
  'not-found': Code.NotFound,
  'already-exists': Code.AlreadyExists,
  'failed-precondition': Code.FailedPrecondition,
  'out-of-range': Code.OutOfRange,
  'resource-exhausted': Code.ResourceExhausted,
};

/** An error with a chosen gRPC code, for checks the CSI layer makes itself. */
export function rpcError(code: Code, message: string): ConnectError {
  return new ConnectError(message, code);
}

/**
 * What connect says when it cannot decode a request body: bytes that are not the request message's protobuf
 * encoding, or a frame marked compressed with no grpc-encoding to undo it. connect (like grpc-go) calls these
 * INTERNAL, but the fault is the caller's, and CSI callers read INTERNAL as a broken plugin.
 */
const UNDECODABLE_REQUEST = ['parse binary: ', 'received compressed envelope, but do not know how to decompress'];

/** Whether a status is connect's INTERNAL for a request it could not decode (answered as INVALID_ARGUMENT instead). */
function isUndecodableRequest(code: number, message: string): boolean {
  return code === Code.Internal && UNDECODABLE_REQUEST.some((prefix) => message.startsWith(prefix));
}

/**
 * Longest status message sent, in UTF-8 bytes. Messages quote request values, which may be 64 KiB of
 * anything; percent-encoded into the grpc-message trailer such a quote outgrows the HTTP/2 header block
 * (node sends RST_STREAM FRAME_SIZE_ERROR, and the client sees INTERNAL instead of the real status).
 */
const MAX_STATUS_MESSAGE_BYTES = 2048;

/** Cuts a message to MAX_STATUS_MESSAGE_BYTES on a character boundary, marking the cut. */
function capMessage(message: string): string {
  if (Buffer.byteLength(message) <= MAX_STATUS_MESSAGE_BYTES) return message;
  let out = '';
  let bytes = 0;
  for (const ch of message) {
    bytes += Buffer.byteLength(ch);
    if (bytes > MAX_STATUS_MESSAGE_BYTES - 3) break;
    out += ch;
  }
  return `${out}…`;
}

/** Maps any thrown value to the status the client sees. */
export function toConnectError(err: unknown): ConnectError {
  let mapped: ConnectError;
  if (err instanceof ConnectError) {
    mapped = isUndecodableRequest(err.code, err.rawMessage)
      ? new ConnectError(err.rawMessage, Code.InvalidArgument, undefined, undefined, err)
      : err;
  } else if (err instanceof EngineError) {
    mapped = new ConnectError(err.message, ENGINE_CODES[err.code], undefined, undefined, err);
  } else if (err instanceof NodeError) {
    mapped = new ConnectError(err.message, NODE_CODES[err.kind], undefined, undefined, err);
  } else if (err instanceof CommandError) {
    // The tool's own words (mount, mkfs, losetup) are what an operator needs to act on.
    mapped = new ConnectError(err.message, Code.Internal, undefined, undefined, err);
  } else {
    return new ConnectError('internal error', Code.Internal, undefined, undefined, err);
  }
  const message = capMessage(mapped.rawMessage);
  if (message === mapped.rawMessage) return mapped;
  // Services attach no error details, so there are none to carry over.
  return new ConnectError(message, mapped.code, mapped.metadata, undefined, mapped.cause);
}

/** gRPC's canonical name of a code, for logs and metric labels. */
export function codeName(code: Code | 0): string {
  if (code === 0) return 'OK';
  // connect spells code 1 "Canceled"; gRPC's canonical name is CANCELLED.
  if (code === Code.Canceled) return 'CANCELLED';
  return Code[code].replace(/[A-Z]/g, (c, i: number) => (i ? '_' : '') + c).toUpperCase();
}

/** Runs a node data-plane call, turning its NodeErrors (and failed tools) into statuses. */
export async function translateNodeErrors<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    if (err instanceof NodeError || err instanceof CommandError) throw toConnectError(err);
    // Whatever else ran out of space (a target directory on the CO's disk): the spec's code for it.
    if (isNoSpace(err))
      throw new ConnectError(`no space left on device: ${(err as Error).message}`, Code.ResourceExhausted);
    throw err;
  }
}

/**
 * Headers of a headers-only gRPC response (ended on the HEADERS frame, as grpc-go expects) for a method
 * this server does not serve: UNIMPLEMENTED, never a bare HTTP 404.
 */
export function unimplementedMethodHeaders(url: string): http2.OutgoingHttpHeaders {
  return {
    'content-type': 'application/grpc',
    'grpc-status': String(Code.Unimplemented),
    'grpc-message': encodeURIComponent(`no such method: ${url}`),
  };
}

/**
 * Trailers on their way out, with connect's INTERNAL for a request it could not decode corrected to
 * INVALID_ARGUMENT (connect decodes a unary request before any interceptor runs, so toConnectError never
 * sees it).
 */
export function correctUndecodableStatus(trailers: http2.OutgoingHttpHeaders): http2.OutgoingHttpHeaders {
  let message = String(trailers['grpc-message'] ?? '');
  try {
    message = decodeURIComponent(message);
  } catch {
    // Not percent-encoded by connect, so not one of its messages.
  }
  const undecodable = isUndecodableRequest(Number(trailers['grpc-status']), message);
  return undecodable ? { ...trailers, 'grpc-status': String(Code.InvalidArgument) } : trailers;
}

/** The code whose canonical gRPC name (e.g. UNAVAILABLE, CANCELLED) is given, or undefined; for configured faults. */
export function codeFromName(name: string): Code | 0 | undefined {
  if (name === 'OK') return 0;
  for (let code = 1; code <= 16; code++) {
    if (codeName(code as Code) === name) return code as Code;
  }
  return undefined;
}
