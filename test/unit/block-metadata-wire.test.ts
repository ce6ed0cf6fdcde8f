/**
 * The hand-written BlockMetadata encoding must put exactly the bytes on the wire that the generic
 * protobuf encoder would for the same response, and the hand-written decoder must read them back.
 */
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { decodeMetadataResponse } from '../../src/client/metadata-wire.js';
import { encodeBlockMetadataField } from '../../src/csi/block-metadata-wire.js';
import {
  BlockMetadataSchema,
  BlockMetadataType,
  GetMetadataAllocatedResponseSchema,
  GetMetadataDeltaResponseSchema,
} from '../../src/gen/csi/v1/csi_pb.js';

/** Ascending, non-overlapping, block-aligned extents as the engine produces them (offset 0 included). */
const extents = fc
  .tuple(
    fc.constantFrom(4096, 65536, 1048576),
    fc.array(fc.tuple(fc.integer({ min: 0, max: 2 ** 20 }), fc.integer({ min: 1, max: 2 ** 12 })), { maxLength: 200 }),
    fc.boolean(),
  )
  .map(([blockSize, gapsAndRuns, startAtZero]) => {
    let block = startAtZero ? 0 : 1;
    return gapsAndRuns.map(([gap, run], i) => {
      block += i === 0 && startAtZero ? 0 : gap + 1;
      const extent = { offset: block * blockSize, length: run * blockSize };
      block += run;
      return extent;
    });
  });

describe('BlockMetadata wire encoding', () => {
  it('matches the generic encoder byte for byte, for both response types', () => {
    fc.assert(
      fc.property(extents, fc.bigInt({ min: 0n, max: 2n ** 52n }), fc.boolean(), (list, capacity, delta) => {
        const schema = delta ? GetMetadataDeltaResponseSchema : GetMetadataAllocatedResponseSchema;
        const generic = create(schema, {
          blockMetadataType: BlockMetadataType.VARIABLE_LENGTH,
          volumeCapacityBytes: capacity,
          blockMetadata: list.map((e) =>
            create(BlockMetadataSchema, { byteOffset: BigInt(e.offset), sizeBytes: BigInt(e.length) }),
          ),
        });
        const fast = create(schema, {
          blockMetadataType: BlockMetadataType.VARIABLE_LENGTH,
          volumeCapacityBytes: capacity,
        });
        fast.$unknown = encodeBlockMetadataField(list);
        expect(Buffer.from(toBinary(schema, fast)).equals(Buffer.from(toBinary(schema, generic)))).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it('decodes to the same tuples as the generic decoder', () => {
    fc.assert(
      fc.property(extents, (list) => {
        const message = create(GetMetadataDeltaResponseSchema, {
          blockMetadataType: BlockMetadataType.FIXED_LENGTH,
          volumeCapacityBytes: 2n ** 40n,
        });
        message.$unknown = encodeBlockMetadataField(list);
        const bytes = toBinary(GetMetadataDeltaResponseSchema, message);
        const fast = decodeMetadataResponse(bytes);
        const generic = fromBinary(GetMetadataDeltaResponseSchema, bytes);
        expect(fast.blockMetadataType).toBe(BlockMetadataType.FIXED_LENGTH);
        expect(fast.volumeCapacityBytes).toBe(2 ** 40);
        expect(generic.blockMetadata.map((b) => [Number(b.byteOffset), Number(b.sizeBytes)])).toEqual(
          list.map((e) => [e.offset, e.length]),
        );
        expect(Array.from(fast.tuples)).toEqual(list.flatMap((e) => [e.offset, e.length]));
      }),
      { numRuns: 300 },
    );
  });

  it('an empty list encodes to nothing', () => {
    expect(encodeBlockMetadataField([])).toEqual([]);
  });

  it('the decoder rejects truncated input', () => {
    const message = create(GetMetadataDeltaResponseSchema, { volumeCapacityBytes: 1n << 30n });
    message.$unknown = encodeBlockMetadataField([{ offset: 1 << 20, length: 4096 }]);
    const bytes = toBinary(GetMetadataDeltaResponseSchema, message);
    expect(() => decodeMetadataResponse(bytes.subarray(0, bytes.length - 1))).toThrow();
  });
});
