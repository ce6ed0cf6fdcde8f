/**
 * The client decodes metadata responses from their bytes, not through message objects. It must read any
 * valid encoding of a response the way the generic protobuf decoder does (other drivers and the sidecar
 * encode generically: fields in any order, zero values omitted, unknown fields present), and refuse bytes
 * that are not a response with a ProtocolError rather than invent extents.
 */
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ProtocolError } from '../../src/client/errors.js';
import { decodeMetadataResponse } from '../../src/client/metadata-wire.js';
import {
  BlockMetadataSchema,
  BlockMetadataType,
  GetMetadataAllocatedResponseSchema,
} from '../../src/gen/csi/v1/csi_pb.js';

/** A varint as bytes, for hand-made messages. */
function varint(n: number): number[] {
  const out: number[] = [];
  while (n >= 128) {
    out.push((n % 128) | 128);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}

describe('metadata response decoding (client)', () => {
  it('reads what the generic encoder writes, offsets up to 2^52 and a zero offset included', () => {
    const tuple = fc.tuple(fc.integer({ min: 0, max: 2 ** 52 }), fc.integer({ min: 1, max: 2 ** 40 }));
    fc.assert(
      fc.property(fc.array(tuple, { maxLength: 300 }), fc.boolean(), (list, fixed) => {
        const bytes = toBinary(
          GetMetadataAllocatedResponseSchema,
          create(GetMetadataAllocatedResponseSchema, {
            blockMetadataType: fixed ? BlockMetadataType.FIXED_LENGTH : BlockMetadataType.VARIABLE_LENGTH,
            volumeCapacityBytes: 2n ** 53n - 1n,
            blockMetadata: list.map(([o, s]) =>
              create(BlockMetadataSchema, { byteOffset: BigInt(o), sizeBytes: BigInt(s) }),
            ),
          }),
        );
        const got = decodeMetadataResponse(bytes);
        expect(got.blockMetadataType).toBe(fixed ? BlockMetadataType.FIXED_LENGTH : BlockMetadataType.VARIABLE_LENGTH);
        expect(got.volumeCapacityBytes).toBe(2 ** 53 - 1);
        expect(Array.from(got.tuples)).toEqual(list.flat());
      }),
      { numRuns: 200 },
    );
  });

  it('skips unknown fields of every wire type, takes fields in any order, and agrees with the generic decoder', () => {
    // BlockMetadata with size before offset, and an unknown fixed64 and length-delimited field inside.
    const inner = [0x10, ...varint(4096), 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x22, 3, 9, 9, 9, 0x08, ...varint(1 << 20)];
    const bytes = Uint8Array.from([
      // unknown field 9, varint; field 2 (capacity) before field 1
      ...[0x48, ...varint(300)],
      ...[0x10, ...varint(1 << 30)],
      ...[0x1a, inner.length, ...inner],
      // unknown fixed32 field 7, then field 1
      ...[0x3d, 1, 2, 3, 4],
      ...[0x08, 2],
      // a second BlockMetadata with offset 0 left out
      ...[0x1a, 3, 0x10, ...varint(8192)],
    ]);
    const generic = fromBinary(GetMetadataAllocatedResponseSchema, bytes);
    const got = decodeMetadataResponse(bytes);
    expect(got.blockMetadataType).toBe(generic.blockMetadataType);
    expect(got.volumeCapacityBytes).toBe(Number(generic.volumeCapacityBytes));
    expect(Array.from(got.tuples)).toEqual(
      generic.blockMetadata.flatMap((b) => [Number(b.byteOffset), Number(b.sizeBytes)]),
    );
    expect(Array.from(got.tuples)).toEqual([1 << 20, 4096, 0, 8192]);
  });

  it('returns every tuple however small its encoding: 10,000 empty BlockMetadata entries (2 bytes each) are 10,000 tuples', () => {
    // The generic decoder reads `1a 00` as a BlockMetadata of offset 0 and size 0; the client then refuses
    // the zero size, but only if the decoder hands every tuple over rather than dropping some.
    const count = 10_000;
    const bytes = Uint8Array.from([0x10, ...varint(1 << 30), ...Array.from({ length: count }, () => [0x1a, 0]).flat()]);
    expect(fromBinary(GetMetadataAllocatedResponseSchema, bytes).blockMetadata).toHaveLength(count);
    expect(decodeMetadataResponse(bytes).tuples).toHaveLength(2 * count);
  });

  it('refuses truncated and malformed bytes with a ProtocolError', () => {
    const good = toBinary(
      GetMetadataAllocatedResponseSchema,
      create(GetMetadataAllocatedResponseSchema, {
        volumeCapacityBytes: 1n << 30n,
        blockMetadata: [create(BlockMetadataSchema, { byteOffset: 1n << 20n, sizeBytes: 4096n })],
      }),
    );
    for (let cut = 1; cut < good.length; cut++) {
      const bytes = good.subarray(0, cut);
      // Some prefixes are themselves valid messages (they end between fields); the rest must be refused.
      let generic: unknown;
      try {
        generic = fromBinary(GetMetadataAllocatedResponseSchema, bytes);
      } catch {
        generic = undefined;
      }
      if (generic === undefined) expect(() => decodeMetadataResponse(bytes)).toThrow(ProtocolError);
    }
    // A BlockMetadata whose length ends inside a varint; wire type 3 (groups); an 11-byte varint.
    expect(() => decodeMetadataResponse(Uint8Array.from([0x1a, 2, 0x08, 0x80, 0x01]))).toThrow(ProtocolError);
    expect(() => decodeMetadataResponse(Uint8Array.from([0x4b]))).toThrow(ProtocolError);
    expect(() => decodeMetadataResponse(Uint8Array.from([0x10, ...Array(10).fill(0xff), 1]))).toThrow(ProtocolError);
  });
});
