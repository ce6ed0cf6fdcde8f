/**
 * A peer's reply is sent on as the bytes it arrived in: the pass-through message must serialize to exactly
 * those bytes, whatever message it is.
 */
import { create, type DescMessage, fromBinary, toBinary } from '@bufbuild/protobuf';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { countField, passThrough } from '../../src/cluster/passthrough.js';
import { encodeBlockMetadataField } from '../../src/csi/block-metadata-wire.js';
import {
  BlockMetadataType,
  CreateVolumeResponseSchema,
  GetMetadataDeltaResponseSchema,
  ListSnapshotsResponseSchema,
} from '../../src/gen/csi/v1/csi_pb.js';

function roundTrip(desc: DescMessage, bytes: Uint8Array): Uint8Array {
  return toBinary(desc, passThrough(desc, bytes));
}

describe('pass-through of peer replies', () => {
  it('re-encodes a metadata response, pre-encoded tuples included, byte for byte', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.integer({ min: 0, max: 2 ** 40 }), fc.integer({ min: 1, max: 2 ** 30 })), {
          maxLength: 300,
        }),
        fc.bigInt({ min: 0n, max: 2n ** 52n }),
        (tuples, capacity) => {
          const message = create(GetMetadataDeltaResponseSchema, {
            blockMetadataType: BlockMetadataType.FIXED_LENGTH,
            volumeCapacityBytes: capacity,
          });
          message.$unknown = encodeBlockMetadataField(tuples.map(([offset, length]) => ({ offset, length })));
          const bytes = toBinary(GetMetadataDeltaResponseSchema, message);
          expect(roundTrip(GetMetadataDeltaResponseSchema, bytes)).toEqual(bytes);
          expect(countField(bytes, 3)).toBe(tuples.length);
        },
      ),
    );
  });

  it('re-encodes unary replies with nested messages, maps and repeated fields byte for byte', () => {
    const volume = toBinary(
      CreateVolumeResponseSchema,
      create(CreateVolumeResponseSchema, {
        volume: {
          volumeId: 'vol-0123456789abcdef@node-a',
          capacityBytes: 1n << 30n,
          volumeContext: { blockSize: '4096', metadataStyle: 'VARIABLE' },
          accessibleTopology: [{ segments: { 'topology.cbt.csi.dev/node': 'node-a' } }],
        },
      }),
    );
    expect(roundTrip(CreateVolumeResponseSchema, volume)).toEqual(volume);
    const list = toBinary(
      ListSnapshotsResponseSchema,
      create(ListSnapshotsResponseSchema, {
        entries: [{ snapshot: { snapshotId: 's@n', readyToUse: true } }, { snapshot: { snapshotId: 't@n' } }],
        nextToken: '12.snap-x',
      }),
    );
    expect(roundTrip(ListSnapshotsResponseSchema, list)).toEqual(list);
    expect(fromBinary(ListSnapshotsResponseSchema, roundTrip(ListSnapshotsResponseSchema, list)).nextToken).toBe(
      '12.snap-x',
    );
  });

  it('passes an empty reply as an empty message, and refuses bytes that do not start with a field tag', () => {
    expect(roundTrip(CreateVolumeResponseSchema, new Uint8Array())).toEqual(new Uint8Array());
    expect(() => passThrough(CreateVolumeResponseSchema, Uint8Array.of(0x80))).toThrow(/field tag/);
    expect(() => passThrough(CreateVolumeResponseSchema, Uint8Array.of(0x00, 0x01))).toThrow(/field tag/);
  });
});
