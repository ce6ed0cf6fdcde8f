/**
 * The wire form of BlockMetadata lists, written by hand because they are the one hot path: generic
 * reflection-based encoding cost ~2.5 µs a tuple (71% of the driver's CPU while streaming), the
 * hand-written form ~0.1 µs. The encoded tuples ride in a response as a single unknown-field entry
 * for field 3 (`block_metadata`), which toBinary writes verbatim after the known fields, so the bytes
 * on the wire are exactly those of the response with its `block_metadata` list filled in (a test
 * checks this against the generic encoder). Clients decode the same way: src/client/metadata-wire.ts.
 */
import type { UnknownField } from '@bufbuild/protobuf';
import { WireType } from '@bufbuild/protobuf/wire';
import type { Extent } from '../../storage-engine/index.js';

/** Field numbers of BlockMetadata and of the responses' block_metadata list. */
const FIELD_BYTE_OFFSET = 1;
const FIELD_SIZE_BYTES = 2;
export const FIELD_BLOCK_METADATA = 3;

const TAG_BYTE_OFFSET = (FIELD_BYTE_OFFSET << 3) | WireType.Varint;
const TAG_SIZE_BYTES = (FIELD_SIZE_BYTES << 3) | WireType.Varint;
const TAG_BLOCK_METADATA = (FIELD_BLOCK_METADATA << 3) | WireType.LengthDelimited;

/** Worst case per tuple: list tag, length, two tagged varints of up to 8 bytes (offsets < 2^53). */
const MAX_TUPLE_BYTES = 1 + 1 + (1 + 8) + (1 + 8);

/** Tuples encoded per response, remembered for the metrics and logs that count them. */
const tupleCounts = new WeakMap<object, number>();

/** How many tuples a response carries, whether as a list or pre-encoded. */
export function tupleCount(message: object): number {
  const list = (message as { blockMetadata?: unknown }).blockMetadata;
  return (Array.isArray(list) ? list.length : 0) + (tupleCounts.get(message) ?? 0);
}

/** Records that `message` carries `count` pre-encoded tuples. */
export function noteTuples(message: object, count: number): void {
  tupleCounts.set(message, count);
}

/**
 * Encodes extents as repeated field 3. toBinary writes an unknown field as its tag followed by `data`,
 * so `data` is everything after the first tuple's tag: first length and body, then tag, length, body of
 * each following tuple.
 */
export function encodeBlockMetadataField(extents: readonly Extent[]): UnknownField[] {
  if (extents.length === 0) return [];
  const out = Buffer.allocUnsafe(extents.length * MAX_TUPLE_BYTES);
  let pos = 0;
  for (let i = 0; i < extents.length; i++) {
    const { offset, length } = extents[i]!;
    if (i > 0) out[pos++] = TAG_BLOCK_METADATA;
    // proto3 leaves zero-valued scalars off the wire; size_bytes is never zero.
    const bodyLength = (offset === 0 ? 0 : 1 + varintSize(offset)) + 1 + varintSize(length);
    out[pos++] = bodyLength; // < 128 always: at most 18 bytes
    if (offset !== 0) {
      out[pos++] = TAG_BYTE_OFFSET;
      pos = writeVarint(out, pos, offset);
    }
    out[pos++] = TAG_SIZE_BYTES;
    pos = writeVarint(out, pos, length);
  }
  return [{ no: FIELD_BLOCK_METADATA, wireType: WireType.LengthDelimited, data: out.subarray(0, pos) }];
}

function varintSize(value: number): number {
  let size = 1;
  while (value >= 128) {
    value = Math.floor(value / 128);
    size++;
  }
  return size;
}

function writeVarint(out: Buffer, pos: number, value: number): number {
  while (value >= 128) {
    out[pos++] = (value % 128) | 128;
    value = Math.floor(value / 128);
  }
  out[pos++] = value;
  return pos;
}
