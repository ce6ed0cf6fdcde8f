/** Argument checks shared by the store's entry points. Each throws the typed error the caller maps. */
import { InvalidArgumentError, OutOfRangeError } from './errors.js';

export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 1024 * 1024;
/** Block indexes live in 32-bit roaring bitmaps. */
export const MAX_BLOCKS = 2 ** 32;
/** Names are labels, not paths; a generous bound keeps the catalog sane. */
export const MAX_NAME_LENGTH = 1024;

/** A block size must be a power of two from 4 KiB to 1 MiB. */
export function checkBlockSize(blockSize: unknown): number {
  if (typeof blockSize !== 'number' || !Number.isInteger(blockSize)) {
    throw new InvalidArgumentError(`block size must be an integer, got ${String(blockSize)}`);
  }
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new InvalidArgumentError(
      `block size must be a power of two from ${MIN_BLOCK_SIZE} to ${MAX_BLOCK_SIZE} bytes, got ${blockSize}`,
    );
  }
  return blockSize;
}

/** A capacity must be a positive whole number of blocks, and addressable. */
export function checkCapacity(capacityBytes: unknown, blockSize: number): number {
  if (typeof capacityBytes === 'number' && Number.isInteger(capacityBytes) && capacityBytes > Number.MAX_SAFE_INTEGER) {
    // A well-formed size, just far past anything addressable (e.g. a request rounded up past 2^53).
    throw new OutOfRangeError(`capacity ${capacityBytes} is more than any volume can address`);
  }
  if (typeof capacityBytes !== 'number' || !Number.isSafeInteger(capacityBytes) || capacityBytes <= 0) {
    throw new InvalidArgumentError(`capacity must be a positive integer number of bytes, got ${String(capacityBytes)}`);
  }
  if (capacityBytes % blockSize !== 0) {
    throw new InvalidArgumentError(`capacity ${capacityBytes} is not a multiple of the block size ${blockSize}`);
  }
  if (capacityBytes / blockSize > MAX_BLOCKS) {
    throw new OutOfRangeError(
      `capacity ${capacityBytes} is more than ${MAX_BLOCKS} blocks of ${blockSize} bytes, the most a volume can address`,
    );
  }
  return capacityBytes;
}

/** A byte range must consist of non-negative integers and lie inside the capacity. */
export function checkRange(offset: unknown, length: unknown, capacityBytes: number, what: string): void {
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) {
    throw new InvalidArgumentError(`${what}: offset must be a non-negative integer, got ${String(offset)}`);
  }
  if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0) {
    throw new InvalidArgumentError(`${what}: length must be a non-negative integer, got ${String(length)}`);
  }
  if (offset + length > capacityBytes) {
    throw new OutOfRangeError(
      `${what}: range [${offset}, ${offset + length}) goes past the capacity of ${capacityBytes} bytes`,
    );
  }
}

/** A starting offset for extent queries: the spec allows any byte from 0 up to the capacity. */
export function checkStartingOffset(startingOffset: unknown, capacityBytes: number): number {
  if (typeof startingOffset !== 'number' || !Number.isSafeInteger(startingOffset)) {
    throw new InvalidArgumentError(`starting offset must be an integer, got ${String(startingOffset)}`);
  }
  if (startingOffset < 0 || startingOffset > capacityBytes) {
    throw new OutOfRangeError(`starting offset ${startingOffset} is outside the snapshot's ${capacityBytes} bytes`);
  }
  return startingOffset;
}

/** Batch sizes bound memory per yielded batch. */
export function checkBatchSize(batchSize: unknown): number {
  if (typeof batchSize !== 'number' || !Number.isSafeInteger(batchSize) || batchSize <= 0) {
    throw new InvalidArgumentError(`batch size must be a positive integer, got ${String(batchSize)}`);
  }
  return batchSize;
}

/** Names are optional; when given they must be non-empty printable strings of bounded length. */
export function checkName(name: unknown, what: string): string | undefined {
  if (name === undefined) return undefined;
  if (typeof name !== 'string' || name.length === 0 || name.length > MAX_NAME_LENGTH) {
    throw new InvalidArgumentError(`${what} name must be a string of 1 to ${MAX_NAME_LENGTH} characters`);
  }
  return name;
}

/** Attributes are a flat string-to-string map. */
export function checkAttributes(attributes: unknown): Record<string, string> {
  if (attributes === undefined) return {};
  if (attributes === null || typeof attributes !== 'object' || Array.isArray(attributes)) {
    throw new InvalidArgumentError('attributes must be an object of string values');
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(attributes)) {
    if (typeof v !== 'string') throw new InvalidArgumentError(`attribute ${JSON.stringify(k)} must be a string`);
    out[k] = v;
  }
  return out;
}
