/**
 * CSI CapacityRange arithmetic: validating a range, choosing a new volume's size from it, and deciding
 * whether an existing size satisfies it. Sizes are whole blocks, so requests round up to the block size.
 * How large a volume may be is the engine's rule (storage-engine/capacity.ts), not decided here.
 */
import { Code } from '@connectrpc/connect';
import type { CapacityRange } from '../gen/csi/v1/csi_pb.js';
import { rpcError } from '../rpc/status.js';

/** Size of a volume whose request names no capacity and no source. */
export const DEFAULT_VOLUME_BYTES = 1024 ** 3;

/** A validated range; 0 means "not specified", as in the protobuf. */
export interface ByteRange {
  requiredBytes: number;
  limitBytes: number;
}

/**
 * Checks a range's own rules: neither bound negative (INVALID_ARGUMENT: the spec says MUST NOT), and
 * limit not below required when both are set. Sizes past 2^53 cannot be provisioned anyway: a required
 * size that large is OUT_OF_RANGE, a limit that large is no limit at all.
 */
export function checkCapacityRange(range: CapacityRange | undefined, field = 'capacity_range'): ByteRange {
  if (!range) return { requiredBytes: 0, limitBytes: 0 };
  if (range.requiredBytes < 0n) {
    throw rpcError(Code.InvalidArgument, `${field}.required_bytes must not be negative, got ${range.requiredBytes}`);
  }
  if (range.limitBytes < 0n) {
    throw rpcError(Code.InvalidArgument, `${field}.limit_bytes must not be negative, got ${range.limitBytes}`);
  }
  if (range.limitBytes !== 0n && range.limitBytes < range.requiredBytes) {
    throw rpcError(
      Code.InvalidArgument,
      `${field}.limit_bytes (${range.limitBytes}) is smaller than required_bytes (${range.requiredBytes})`,
    );
  }
  if (range.requiredBytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw rpcError(
      Code.OutOfRange,
      `${field}.required_bytes ${range.requiredBytes} is beyond what a volume can address`,
    );
  }
  const limit = range.limitBytes > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(range.limitBytes);
  return { requiredBytes: Number(range.requiredBytes), limitBytes: limit };
}

/** Whether a volume of `bytes` satisfies the range. */
export function fitsRange(bytes: number, range: ByteRange): boolean {
  return bytes >= range.requiredBytes && (range.limitBytes === 0 || bytes <= range.limitBytes);
}

export function roundUp(bytes: number, blockSize: number): number {
  return Math.ceil(bytes / blockSize) * blockSize;
}

export function roundDown(bytes: number, blockSize: number): number {
  return Math.floor(bytes / blockSize) * blockSize;
}

/**
 * The size of a new volume: required_bytes rounded up to the block size, and never less than the
 * source's size (a restored or cloned volume holds all of its source). With no required size, the
 * source's size, else DEFAULT_VOLUME_BYTES kept under the limit. OUT_OF_RANGE when nothing fits.
 */
export function newVolumeBytes(range: ByteRange, blockSize: number, sourceBytes: number | undefined): number {
  let bytes: number;
  if (range.requiredBytes === 0) {
    bytes = sourceBytes ?? DEFAULT_VOLUME_BYTES;
    if (sourceBytes === undefined && range.limitBytes !== 0)
      bytes = Math.min(bytes, roundDown(range.limitBytes, blockSize));
  } else {
    bytes = Math.max(roundUp(range.requiredBytes, blockSize), sourceBytes ?? 0);
  }
  if (bytes === 0 || (range.limitBytes !== 0 && bytes > range.limitBytes)) {
    const why =
      sourceBytes !== undefined && bytes === sourceBytes
        ? `the source holds ${sourceBytes} bytes`
        : `volumes are whole ${blockSize}-byte blocks`;
    throw rpcError(
      Code.OutOfRange,
      `no size satisfies capacity_range [${range.requiredBytes}, ${range.limitBytes || 'unlimited'}]: ${why}`,
    );
  }
  return bytes;
}
