/**
 * Behaviour profiles (StorageClass `metadataProfile`): each answers in the shape of the driver it mimics,
 * and stays spec-correct. Volumes and snapshots are made through the Controller service (as the sidecars
 * do); data is written straight into the store; answers are read with the independent grpc-js client.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { status } from '@grpc/grpc-js';
import { BlockMetadataType } from '../../src/gen/csi/v1/csi_pb.js';
import { startTestDriver, type TestDriver } from '../support/test-driver.js';
import type { RpcError } from '../support/csi-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface Tuple {
  offset: number;
  length: number;
}

let t: TestDriver;
beforeAll(async () => {
  t = await startTestDriver({ defaultMaxResults: 4096 });
});
afterAll(async () => {
  await t?.stop();
});

const BLOCK_CAP = { accessMode: { mode: 1 }, accessType: { case: 'block' as const, value: {} } };
let names = 0;

async function volume(parameters: Record<string, string>, capacityBytes = 64 * MiB): Promise<string> {
  const res = await t.controller.call('createVolume', {
    name: `profile-vol-${++names}`,
    capacityRange: { requiredBytes: BigInt(capacityBytes) },
    volumeCapabilities: [BLOCK_CAP],
    parameters,
  });
  return res.volume!.volumeId;
}

async function snapshot(volumeId: string): Promise<string> {
  const res = await t.controller.call('createSnapshot', { name: `profile-snap-${++names}`, sourceVolumeId: volumeId });
  return res.snapshot!.snapshotId;
}

function write(volumeId: string, offset: number, length: number): void {
  t.driver.store.write(volumeId, offset, Buffer.alloc(length, 0xab));
}

async function allocated(snapshotId: string, maxResults = 0, startingOffset = 0n) {
  return t.metadata.collect('getMetadataAllocated', { snapshotId, maxResults, startingOffset });
}
async function delta(baseSnapshotId: string, targetSnapshotId: string, maxResults = 0, startingOffset = 0n) {
  return t.metadata.collect('getMetadataDelta', { baseSnapshotId, targetSnapshotId, maxResults, startingOffset });
}

/** grpc-js leaves reserved characters of grpc-message percent-encoded (it uses decodeURI); grpc-go decodes them. */
function details(err: RpcError): string {
  return decodeURIComponent(err.details);
}

function tuples(messages: { blockMetadata: { byteOffset: bigint; sizeBytes: bigint }[] }[]): Tuple[] {
  return messages.flatMap((m) =>
    m.blockMetadata.map((b) => ({ offset: Number(b.byteOffset), length: Number(b.sizeBytes) })),
  );
}

function expectOrderedDisjoint(list: Tuple[]): void {
  for (let i = 1; i < list.length; i++)
    expect(list[i]!.offset).toBeGreaterThanOrEqual(list[i - 1]!.offset + list[i - 1]!.length);
}

/** Every byte of `exact` lies inside some tuple of `reported`. */
function expectCovers(reported: Tuple[], exact: Tuple[]): void {
  for (const e of exact) {
    for (let at = e.offset; at < e.offset + e.length; at += 4 * KiB) {
      expect(
        reported.some((r) => r.offset <= at && at < r.offset + r.length),
        `byte ${at} is reported`,
      ).toBe(true);
    }
  }
}

describe('exact profile (default)', () => {
  test('exact: reports exactly the written blocks, merged runs, in the volume style', async () => {
    const vol = await volume({});
    write(vol, 8 * KiB, 12 * KiB);
    const snap = await snapshot(vol);
    const messages = await allocated(snap);
    expect(messages).toHaveLength(1);
    expect(messages[0]!.blockMetadataType).toBe(BlockMetadataType.VARIABLE_LENGTH);
    expect(tuples(messages)).toEqual([{ offset: 8 * KiB, length: 12 * KiB }]);
  });
});

describe('hostpath profile', () => {
  test('hostpath: FIXED_LENGTH 4 KiB tuples even on a 64 KiB-block volume', async () => {
    const vol = await volume({ metadataProfile: 'hostpath', blockSize: '64Ki', metadataStyle: 'VARIABLE' });
    write(vol, 128 * KiB, 64 * KiB);
    const snap = await snapshot(vol);
    const messages = await allocated(snap);
    for (const m of messages) expect(m.blockMetadataType).toBe(BlockMetadataType.FIXED_LENGTH);
    const list = tuples(messages);
    expect(list).toHaveLength(16);
    for (const [i, tuple] of list.entries())
      expect(tuple).toEqual({ offset: 128 * KiB + i * 4 * KiB, length: 4 * KiB });
  });

  test('hostpath: at most 256 tuples a message, whether max_results is 0 or larger; smaller max_results honoured', async () => {
    const vol = await volume({ metadataProfile: 'hostpath' });
    write(vol, 0, 1000 * 4 * KiB);
    const snap = await snapshot(vol);
    for (const maxResults of [0, 1000, 100000]) {
      const messages = await allocated(snap, maxResults);
      expect(messages.map((m) => m.blockMetadata.length)).toEqual([256, 256, 256, 232]);
      expect(tuples(messages)).toHaveLength(1000);
    }
    const small = await allocated(snap, 100);
    expect(small.map((m) => m.blockMetadata.length)).toEqual([...Array(10).fill(100)]);
  });

  test('hostpath: starting_offset inside a block starts at that block; tuples ordered', async () => {
    const vol = await volume({ metadataProfile: 'hostpath' });
    write(vol, 0, 40 * KiB);
    const snap = await snapshot(vol);
    const list = tuples(await allocated(snap, 0, BigInt(9 * KiB)));
    expect(list[0]).toEqual({ offset: 8 * KiB, length: 4 * KiB });
    expect(list).toHaveLength(8);
    expectOrderedDisjoint(list);
  });

  test('hostpath: a deleted base snapshot is NOT_FOUND "cannot find the source snapshot"', async () => {
    const vol = await volume({ metadataProfile: 'hostpath' });
    const base = await snapshot(vol);
    write(vol, 0, 4 * KiB);
    const target = await snapshot(vol);
    await t.controller.call('deleteSnapshot', { snapshotId: base });
    const err = (await delta(base, target).catch((e: unknown) => e)) as RpcError;
    expect(err.code).toBe(status.NOT_FOUND);
    expect(details(err)).toBe('cannot find the source snapshot');
  });

  test('hostpath: an empty answer is one message with no tuples', async () => {
    const vol = await volume({ metadataProfile: 'hostpath' });
    const snap = await snapshot(vol);
    const messages = await allocated(snap);
    expect(messages).toHaveLength(1);
    expect(messages[0]!.blockMetadata).toEqual([]);
    expect(messages[0]!.volumeCapacityBytes).toBe(BigInt(64 * MiB));
  });
});

describe('ceph-rbd profile', () => {
  test('ceph-rbd: VARIABLE_LENGTH, one whole 4 MiB object per object touched, never merged across objects', async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd' });
    const base = await snapshot(vol);
    write(vol, 4 * KiB, 4 * KiB); // object 0
    write(vol, 4 * MiB - 4 * KiB, 8 * KiB); // objects 0 and 1
    write(vol, 9 * MiB, 4 * KiB); // object 2
    const exact = [
      { offset: 4 * KiB, length: 4 * KiB },
      { offset: 4 * MiB - 4 * KiB, length: 8 * KiB },
      { offset: 9 * MiB, length: 4 * KiB },
    ];
    const target = await snapshot(vol);
    const messages = await delta(base, target);
    for (const m of messages) expect(m.blockMetadataType).toBe(BlockMetadataType.VARIABLE_LENGTH);
    const list = tuples(messages);
    expect(list).toEqual([
      { offset: 0, length: 4 * MiB },
      { offset: 4 * MiB, length: 4 * MiB },
      { offset: 8 * MiB, length: 4 * MiB },
    ]);
    expectCovers(list, exact);
  });

  test('ceph-rbd: objectSize parameter sets the granularity; the last object is cut at the capacity', async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd', objectSize: '1Mi' }, 2 * MiB + 512 * KiB);
    write(vol, 2 * MiB + 8 * KiB, 4 * KiB);
    write(vol, 100 * KiB, 4 * KiB);
    const snap = await snapshot(vol);
    expect(tuples(await allocated(snap))).toEqual([
      { offset: 0, length: 1 * MiB },
      { offset: 2 * MiB, length: 512 * KiB },
    ]);
  });

  test('ceph-rbd: at most 128 tuples a message whatever max_results asks above that', async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd', objectSize: '4Ki' }, 4 * MiB);
    for (let i = 0; i < 300; i++) write(vol, i * 8 * KiB, 4 * KiB); // 300 separate objects
    const snap = await snapshot(vol);
    for (const maxResults of [0, 500]) {
      const messages = await allocated(snap, maxResults);
      expect(messages.map((m) => m.blockMetadata.length)).toEqual([128, 128, 44]);
    }
    expect((await allocated(snap, 50)).map((m) => m.blockMetadata.length)).toEqual([50, 50, 50, 50, 50, 50]);
  });

  test('ceph-rbd: nothing to report sends no message at all, as ceph-csi does', async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd' });
    const a = await snapshot(vol);
    const b = await snapshot(vol);
    expect(await delta(a, b)).toEqual([]);
  });

  test('ceph-rbd: starting_offset inside an object reports that whole object first', async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd' });
    write(vol, 6 * MiB, 4 * KiB);
    write(vol, 13 * MiB, 4 * KiB);
    const snap = await snapshot(vol);
    const list = tuples(await allocated(snap, 0, BigInt(5 * MiB + 100 * KiB)));
    expect(list).toEqual([
      { offset: 4 * MiB, length: 4 * MiB },
      { offset: 12 * MiB, length: 4 * MiB },
    ]);
  });

  test("ceph-rbd: a deleted base snapshot is NOT_FOUND with ceph-csi's message", async () => {
    const vol = await volume({ metadataProfile: 'ceph-rbd' });
    const base = await snapshot(vol);
    write(vol, 0, 4 * KiB);
    const target = await snapshot(vol);
    await t.controller.call('deleteSnapshot', { snapshotId: base });
    const err = (await delta(base, target).catch((e: unknown) => e)) as RpcError;
    expect(err.code).toBe(status.NOT_FOUND);
    expect(details(err).startsWith(`snapshot "${base}" not found: `)).toBe(true);
  });
});

describe('profile parameters', () => {
  test('an unknown metadataProfile is INVALID_ARGUMENT naming the parameter', async () => {
    const err = (await volume({ metadataProfile: 'netapp' }).catch((e: unknown) => e)) as RpcError;
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(details(err)).toMatch(/metadataProfile "netapp" must be one of exact, hostpath, ceph-rbd/);
  });

  test('objectSize without the ceph-rbd profile, or not a power of two, is INVALID_ARGUMENT', async () => {
    const a = (await volume({ objectSize: '4Mi' }).catch((e: unknown) => e)) as RpcError;
    expect(a.code).toBe(status.INVALID_ARGUMENT);
    expect(details(a)).toMatch(/objectSize applies only to metadataProfile ceph-rbd/);
    const b = (await volume({ metadataProfile: 'ceph-rbd', objectSize: '3Mi' }).catch((e: unknown) => e)) as RpcError;
    expect(b.code).toBe(status.INVALID_ARGUMENT);
    expect(details(b)).toMatch(/objectSize "3Mi" must be a power of two/);
  });

  test('the driver default profile (serve --metadata-profile) applies to volumes whose StorageClass names none', async () => {
    const other = await startTestDriver({ defaultMetadataProfile: 'hostpath' });
    try {
      const vol = await other.controller.call('createVolume', {
        name: 'default-profile',
        capacityRange: { requiredBytes: BigInt(MiB) },
        volumeCapabilities: [BLOCK_CAP],
      });
      other.driver.store.write(vol.volume!.volumeId, 0, Buffer.alloc(8 * KiB, 1));
      const snap = await other.controller.call('createSnapshot', { name: 's', sourceVolumeId: vol.volume!.volumeId });
      const messages = await other.metadata.collect('getMetadataAllocated', { snapshotId: snap.snapshot!.snapshotId });
      expect(messages[0]!.blockMetadataType).toBe(BlockMetadataType.FIXED_LENGTH);
      expect(tuples(messages)).toHaveLength(2);
    } finally {
      await other.stop();
    }
  });
});
