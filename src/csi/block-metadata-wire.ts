/**
 * The wire form of BlockMetadata lists, written by hand because they are the one hot path: generic
 * reflection-based encoding cost ~2.5 µs a tuple (71% of the driver's CPU while streaming), the
 * hand-written form ~0.1 µs. The encoded tuples ride in a response as a single unknown-field entry
 * for field 3 (`block_metadata`), which toBinary writes verbatim after the known fields, so the bytes
 * on the wire are exactly those of the response with its `block_metadata` list filled in (a test
 * checks this against the generic encoder). The decoder is for clients (benchmarks, tools) that want
 * tuples without building a message object each.
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

/** A metadata response decoded without message objects. */
export interface DecodedMetadataResponse {
  blockMetadataType: number;
  volumeCapacityBytes: number;
  /** Byte offsets and sizes, tuple i at [2i, 2i + 1]. */
  tuples: Float64Array;
}

/**
 * Decodes a GetMetadataAllocated/GetMetadataDelta response (both share field numbers 1, 2, 3). Unknown
 * fields are skipped, as protobuf requires. Throws on malformed input.
 */
export function decodeMetadataResponse(bytes: Uint8Array): DecodedMetadataResponse {
  let pos = 0;
  const readVarint = (): number => {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (pos >= bytes.length) throw new Error('truncated varint');
      const b = bytes[pos++]!;
      result += (b & 127) * scale;
      if (b < 128) return result;
      scale *= 128;
    }
    throw new Error('varint too long');
  };
  let type = 0;
  let capacity = 0;
  const values: number[] = [];
  while (pos < bytes.length) {
    const tag = readVarint();
    const field = Math.floor(tag / 8);
    const wire = tag & 7;
    if (field === 1 && wire === WireType.Varint) type = readVarint();
    else if (field === 2 && wire === WireType.Varint) capacity = readVarint();
    else if (field === FIELD_BLOCK_METADATA && wire === WireType.LengthDelimited) {
      const end = readVarint() + pos;
      let offset = 0;
      let size = 0;
      while (pos < end) {
        const t = readVarint();
        if (t === TAG_BYTE_OFFSET) offset = readVarint();
        else if (t === TAG_SIZE_BYTES) size = readVarint();
        else skip(t & 7);
      }
      values.push(offset, size);
    } else skip(wire);
  }
  return { blockMetadataType: type, volumeCapacityBytes: capacity, tuples: Float64Array.from(values) };

  function skip(wire: number): void {
    if (wire === WireType.Varint) readVarint();
    else if (wire === WireType.Bit64) pos += 8;
    else if (wire === WireType.Bit32) pos += 4;
    else if (wire === WireType.LengthDelimited) pos += readVarint();
    else throw new Error(`unsupported wire type ${wire}`);
    if (pos > bytes.length) throw new Error('truncated field');
  }
}
