/**
 * Argument validation of the block store: every bad argument is refused with the typed error (class
 * and `code`) the API names, and a refused call leaves the store exactly as it was: same volumes,
 * snapshots, space accounting, layer files and content.
 */
import { describe, expect, test } from 'vitest';
import type { BlockStore } from '../../storage-engine/index.js';
import {
  AlreadyExistsError,
  BusyError,
  InvalidArgumentError,
  NoSpaceError,
  NotFoundError,
  OutOfRangeError,
  StoreClosedError,
  UnrelatedSnapshotsError,
  type EngineError,
  type EngineErrorCode,
} from '../../storage-engine/errors.js';
import type { CreateVolumeRequest, SnapshotInfo, StoreOptions, VolumeInfo } from '../../storage-engine/types.js';
import {
  KiB,
  MiB,
  collect,
  expectEngineError,
  expectSameBytes,
  expectThrowsNow,
  layerFiles,
  pattern,
  sha256,
  useTempStores,
} from './support/example-support.js';

const stores = useTempStores();

const CAP = 1 * MiB;
const BLOCK = 4096;
const TWO_POW_32 = 2 ** 32;

interface Fixture {
  store: BlockStore;
  dir: string;
  base: VolumeInfo;
  other: VolumeInfo;
  s1: SnapshotInfo;
  s2: SnapshotInfo;
  o1: SnapshotInfo;
}

/** Two volumes with data, trims and snapshots, everything flushed: the state refused calls must not disturb. */
async function fixture(options: StoreOptions = {}): Promise<Fixture> {
  const { store, dir } = stores.open({ autoCompact: false, ...options });
  const base = await store.createVolume({ name: 'base', capacityBytes: CAP, attributes: { tier: 'gold' } });
  store.write(base.id, 0, pattern(1, 64 * KiB));
  store.write(base.id, 300 * KiB + 7, pattern(2, 10_000));
  const s1 = await store.createSnapshot({ volumeId: base.id, name: 's1' });
  store.write(base.id, 32 * KiB, pattern(3, 64 * KiB));
  store.trim(base.id, 8 * KiB, 8 * KiB);
  const s2 = await store.createSnapshot({ volumeId: base.id, name: 's2' });
  store.write(base.id, CAP - 5000, pattern(4, 5000));
  await store.flush(base.id);
  const other = await store.createVolume({ name: 'other', capacityBytes: 256 * KiB });
  store.write(other.id, 0, pattern(5, 8 * KiB));
  const o1 = await store.createSnapshot({ volumeId: other.id, name: 'o1' });
  await store.flush(other.id);
  return { store, dir, base, other, s1, s2, o1 };
}

/** Everything a caller (or the disk) can observe of the store. */
function captureState(store: BlockStore, dir: string): unknown {
  const volumes = store.listVolumes();
  const snapshots = store.listSnapshots();
  // The catalog file's size is not store state: SQLite moves pages between the database and its WAL.
  const { catalogBytes: _catalogBytes, ...usage } = store.spaceUsage();
  const contents: Record<string, string> = {};
  for (const v of volumes) contents[v.id] = sha256(store.read(v.id, 0, v.capacityBytes));
  for (const s of snapshots) contents[s.id] = sha256(store.readSnapshot(s.id, 0, s.capacityBytes));
  return { volumes, snapshots, usage, contents, layerFiles: layerFiles(dir) };
}

/** Runs a looped assertion so that a failure says which case of the loop it was. */
async function labelled(label: string, check: () => Promise<void>): Promise<void> {
  try {
    await check();
  } catch (err) {
    throw new Error(`${label}: ${err instanceof Error ? err.message : String(err)}`);
  }
}

type ErrorClass = abstract new (...args: never[]) => EngineError;

async function refusedWithoutChange(
  f: Fixture,
  call: () => unknown,
  cls: ErrorClass,
  code: EngineErrorCode,
): Promise<void> {
  const before = captureState(f.store, f.dir);
  await expectEngineError(call, cls, code);
  expect(captureState(f.store, f.dir)).toEqual(before);
}

describe('createVolume capacity and block size', () => {
  test.each([
    ['negative', -4096],
    ['zero', 0],
    ['NaN', Number.NaN],
    ['fractional', 4096.5],
    ['not a multiple of the block size', CAP + 1],
    ['a multiple of 4 KiB but not of the default block size', 4096 * 3],
  ])('a %s capacity is InvalidArgument and creates nothing', async (_what, capacityBytes) => {
    // The last row only makes sense with a default block size above 4 KiB.
    const f = await fixture({ defaultBlockSize: 8192 });
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'bad', capacityBytes }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
    expect(f.store.findVolumeByName('bad')).toBeUndefined();
  });

  test.each([
    ['0', 0],
    ['512 (below 4 KiB)', 512],
    ['3000 (not a power of two)', 3000],
    ['12 KiB (not a power of two, in range)', 12 * KiB],
    ['2 MiB (above 1 MiB)', 2 * MiB],
    ['4096.5 (not an integer)', 4096.5],
    ['-4096', -4096],
  ])('block size %s is InvalidArgument and creates nothing', async (_what, blockSize) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'bad', capacityBytes: 4 * MiB, blockSize }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });

  test.each([4096, 8192, 65536, 1048576])(
    'block size %i (a power of two from 4 KiB to 1 MiB) is accepted',
    async (blockSize) => {
      const f = await fixture();
      const v = await f.store.createVolume({ capacityBytes: 4 * MiB, blockSize });
      expect(v.blockSize).toBe(blockSize);
      expect(v.capacityBytes).toBe(4 * MiB);
    },
  );

  test.each([
    ['4 KiB', 4096],
    ['1 MiB', MiB],
  ])('a capacity of more than 2^32 blocks of %s is OutOfRange and creates nothing', async (_what, blockSize) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'huge', capacityBytes: (TWO_POW_32 + 1) * blockSize, blockSize }),
      OutOfRangeError,
      'OUT_OF_RANGE',
    );
  });

  // That exactly 2^32 blocks is accepted (the bound is inclusive) needs a filesystem that holds a 16 TiB file,
  // which the temp directory's ext4 does not: capacity.test.ts checks it on a tmpfs, to the last block.

  test('a refused named create does not reserve the name', async () => {
    const f = await fixture();
    await expectEngineError(
      () => f.store.createVolume({ name: 'later', capacityBytes: 100 }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
    const v = await f.store.createVolume({ name: 'later', capacityBytes: 64 * KiB });
    expect(v.capacityBytes).toBe(64 * KiB);
    expect(f.store.findVolumeByName('later')?.id).toBe(v.id);
  });
});

describe('byte ranges of read, write, trim and readSnapshot', () => {
  const invalid: Array<[string, number, number]> = [
    ['negative offset', -1, 10],
    ['fractional offset', 1.5, 10],
    ['NaN offset', Number.NaN, 10],
    ['negative length', 0, -1],
    ['fractional length', 0, 2.5],
    ['NaN length', 0, Number.NaN],
  ];
  const outOfRange: Array<[string, number, number]> = [
    ['offset at capacity', CAP, 1],
    ['range ending one byte past capacity', CAP - 10, 11],
    ['offset past capacity', CAP + BLOCK, BLOCK],
    ['offset + length overflowing the safe integer range', CAP - 1, Number.MAX_SAFE_INTEGER],
    ['huge offset', Number.MAX_SAFE_INTEGER, 1],
  ];

  test.each(invalid)('read with a %s is InvalidArgument', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.read(f.base.id, offset, length),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });
  test.each(outOfRange)('read with a %s is OutOfRange', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(f, () => f.store.read(f.base.id, offset, length), OutOfRangeError, 'OUT_OF_RANGE');
  });

  test.each(invalid)('trim with a %s is InvalidArgument and zeroes nothing', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.trim(f.base.id, offset, length),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });
  test.each(outOfRange)('trim with a %s is OutOfRange and zeroes nothing', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(f, () => f.store.trim(f.base.id, offset, length), OutOfRangeError, 'OUT_OF_RANGE');
  });

  test.each([
    ['negative offset', -1],
    ['fractional offset', 1.5],
    ['NaN offset', Number.NaN],
  ])('write at a %s is InvalidArgument and writes nothing', async (_what, offset) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.write(f.base.id, offset, pattern(9, 100)),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });

  test.each([
    ['that starts at capacity', CAP, 1],
    ['that ends one byte past capacity (no partial write either)', CAP - 10, 11],
    ['that starts past capacity', CAP + BLOCK, BLOCK],
    ['at a huge offset', Number.MAX_SAFE_INTEGER, 1],
  ])('a write %s is OutOfRange and writes nothing', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.write(f.base.id, offset, pattern(9, length)),
      OutOfRangeError,
      'OUT_OF_RANGE',
    );
  });

  test.each(invalid)('readSnapshot with a %s is InvalidArgument', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.readSnapshot(f.s1.id, offset, length),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });
  test.each(outOfRange)('readSnapshot with a %s is OutOfRange', async (_what, offset, length) => {
    const f = await fixture();
    await refusedWithoutChange(f, () => f.store.readSnapshot(f.s1.id, offset, length), OutOfRangeError, 'OUT_OF_RANGE');
  });

  test("readSnapshot is bounded by the snapshot's capacity, not the volume's grown one", async () => {
    const f = await fixture();
    await f.store.growVolume(f.base.id, 2 * CAP);
    await refusedWithoutChange(f, () => f.store.readSnapshot(f.s1.id, CAP, 1), OutOfRangeError, 'OUT_OF_RANGE');
    expect(f.store.read(f.base.id, CAP, 1).length).toBe(1);
  });
});

describe('unknown and malformed IDs are NotFound', () => {
  const badIds: Array<[string, string]> = [
    ['well-formed unknown volume ID', 'vol-0123456789abcdef'],
    ['well-formed unknown snapshot ID', 'snap-0123456789abcdef'],
    ['path traversal', '../../etc'],
    ['path traversal to a file', '../../etc/passwd'],
    ['bare volume prefix', 'vol-'],
    ['bare snapshot prefix', 'snap-'],
    ['empty string', ''],
    ['prefix followed by traversal', 'vol-../../../../etc'],
    ['ID with a NUL byte', 'vol-0123456789abcde\0'],
    ['upper-case hex', 'vol-0123456789ABCDEF'],
    ['very long string', `vol-${'a'.repeat(100_000)}`],
  ];

  const volumeCalls: Array<[string, (f: Fixture, id: string) => unknown]> = [
    ['getVolume', (f, id) => f.store.getVolume(id)],
    ['deleteVolume', (f, id) => f.store.deleteVolume(id)],
    ['growVolume', (f, id) => f.store.growVolume(id, 2 * CAP)],
    ['write', (f, id) => f.store.write(id, 0, pattern(7, 10))],
    ['read', (f, id) => f.store.read(id, 0, 10)],
    ['trim', (f, id) => f.store.trim(id, 0, BLOCK)],
    ['flush', (f, id) => f.store.flush(id)],
    ['createSnapshot', (f, id) => f.store.createSnapshot({ volumeId: id, name: 'n' })],
    [
      'createVolume from a volume',
      (f, id) => f.store.createVolume({ name: 'n', sourceVolumeId: id, capacityBytes: CAP }),
    ],
    ['hold', (f, id) => f.store.hold(id, 'node-1')],
  ];
  const snapshotCalls: Array<[string, (f: Fixture, id: string) => unknown]> = [
    ['getSnapshot', (f, id) => f.store.getSnapshot(id)],
    ['deleteSnapshot', (f, id) => f.store.deleteSnapshot(id)],
    ['readSnapshot', (f, id) => f.store.readSnapshot(id, 0, 10)],
    ['allocated', (f, id) => f.store.allocated(id)],
    ['delta (base)', (f, id) => f.store.delta(id, f.s2.id)],
    ['delta (target)', (f, id) => f.store.delta(f.s1.id, id)],
    [
      'createVolume from a snapshot',
      (f, id) => f.store.createVolume({ name: 'n', sourceSnapshotId: id, capacityBytes: CAP }),
    ],
  ];

  test.each(volumeCalls)('%s refuses unknown or malformed volume IDs and changes nothing', async (_name, call) => {
    const f = await fixture();
    // A real snapshot ID is a well-formed ID of the wrong kind.
    for (const [what, id] of [...badIds, ['snapshot ID given as a volume ID', f.s1.id] as [string, string]]) {
      const before = captureState(f.store, f.dir);
      await labelled(what, () => expectEngineError(() => call(f, id), NotFoundError, 'NOT_FOUND'));
      expect(captureState(f.store, f.dir), what).toEqual(before);
    }
  });

  test.each(snapshotCalls)('%s refuses unknown or malformed snapshot IDs and changes nothing', async (_name, call) => {
    const f = await fixture();
    for (const [what, id] of [...badIds, ['volume ID given as a snapshot ID', f.base.id] as [string, string]]) {
      const before = captureState(f.store, f.dir);
      await labelled(what, () => expectEngineError(() => call(f, id), NotFoundError, 'NOT_FOUND'));
      expect(captureState(f.store, f.dir), what).toEqual(before);
    }
  });

  test('IDs of deleted volumes and snapshots are NotFound', async () => {
    const f = await fixture();
    await f.store.deleteVolume(f.other.id);
    await f.store.deleteSnapshot(f.s1.id);
    const before = captureState(f.store, f.dir);
    await expectEngineError(() => f.store.getVolume(f.other.id), NotFoundError, 'NOT_FOUND');
    await expectEngineError(() => f.store.write(f.other.id, 0, pattern(1, 10)), NotFoundError, 'NOT_FOUND');
    await expectEngineError(() => f.store.deleteVolume(f.other.id), NotFoundError, 'NOT_FOUND');
    await expectEngineError(() => f.store.readSnapshot(f.s1.id, 0, 10), NotFoundError, 'NOT_FOUND');
    await expectEngineError(() => f.store.deleteSnapshot(f.s1.id), NotFoundError, 'NOT_FOUND');
    // A deleted base is the exception: it answers from its change record (invariant 8, deleted-base.test.ts).
    expect(() => f.store.delta(f.s1.id, f.s2.id)).not.toThrow();
    await expectEngineError(
      () => f.store.createVolume({ sourceSnapshotId: f.s1.id, capacityBytes: CAP }),
      NotFoundError,
      'NOT_FOUND',
    );
    expect(captureState(f.store, f.dir)).toEqual(before);
    // The snapshot of the deleted volume is still there and readable.
    expect(f.store.readSnapshot(f.o1.id, 0, 10).length).toBe(10);
  });

  test('allocated and delta refuse unknown IDs when called, before any iteration', async () => {
    const f = await fixture();
    expectThrowsNow(() => f.store.allocated('snap-0123456789abcdef'), NotFoundError, 'NOT_FOUND');
    expectThrowsNow(() => f.store.delta('../../etc', f.s2.id), NotFoundError, 'NOT_FOUND');
    expectThrowsNow(() => f.store.delta(f.s1.id, ''), NotFoundError, 'NOT_FOUND');
  });

  test('findVolumeByName and findSnapshotByName return undefined for unknown names', async () => {
    const f = await fixture();
    expect(f.store.findVolumeByName('../../etc')).toBeUndefined();
    expect(f.store.findSnapshotByName('no-such-snapshot')).toBeUndefined();
    expect(f.store.findVolumeByName('base')?.id).toBe(f.base.id);
    expect(f.store.findSnapshotByName('s1')?.id).toBe(f.s1.id);
  });
});

describe('clones', () => {
  test("cloning a snapshot into a smaller capacity than the snapshot's is InvalidArgument", async () => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'c', sourceSnapshotId: f.s1.id, capacityBytes: CAP / 2 }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });

  test("cloning a snapshot with a block size other than the snapshot's is InvalidArgument", async () => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'c', sourceSnapshotId: f.s1.id, capacityBytes: CAP, blockSize: 8192 }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });

  test("cloning a volume into a smaller capacity than the volume's is InvalidArgument and freezes nothing", async () => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'c', sourceVolumeId: f.base.id, capacityBytes: CAP / 2 }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });

  test('naming both a source snapshot and a source volume is InvalidArgument', async () => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () =>
        f.store.createVolume({ name: 'c', sourceSnapshotId: f.s1.id, sourceVolumeId: f.base.id, capacityBytes: CAP }),
      InvalidArgumentError,
      'INVALID_ARGUMENT',
    );
  });

  test("a clone with the block size omitted takes the snapshot's, whatever the store default", async () => {
    const f = await fixture();
    const big = await f.store.createVolume({ capacityBytes: CAP, blockSize: 65536 });
    const snap = await f.store.createSnapshot({ volumeId: big.id });
    const clone = await f.store.createVolume({ sourceSnapshotId: snap.id, capacityBytes: 2 * CAP });
    expect(clone.blockSize).toBe(65536);
    const same = await f.store.createVolume({ sourceSnapshotId: snap.id, capacityBytes: CAP, blockSize: 65536 });
    expect(same.blockSize).toBe(65536);
  });
});

describe('growVolume', () => {
  test.each([
    ['smaller than the current capacity', CAP / 2, InvalidArgumentError, 'INVALID_ARGUMENT'],
    ['not a multiple of the block size', CAP + 100, InvalidArgumentError, 'INVALID_ARGUMENT'],
    ['NaN', Number.NaN, InvalidArgumentError, 'INVALID_ARGUMENT'],
    ['negative', -CAP, InvalidArgumentError, 'INVALID_ARGUMENT'],
    ['more than 2^32 blocks', (TWO_POW_32 + 1) * BLOCK, OutOfRangeError, 'OUT_OF_RANGE'],
  ] as Array<[string, number, ErrorClass, EngineErrorCode]>)(
    'growing to a size %s is refused and changes nothing',
    async (_what, size, cls, code) => {
      const f = await fixture();
      await refusedWithoutChange(f, () => f.store.growVolume(f.base.id, size), cls, code);
    },
  );

  test('growing keeps the content and extends with zeros', async () => {
    const f = await fixture();
    const before = f.store.read(f.base.id, 0, CAP);
    const grown = await f.store.growVolume(f.base.id, 3 * CAP);
    expect(grown.capacityBytes).toBe(3 * CAP);
    expect(f.store.getVolume(f.base.id).capacityBytes).toBe(3 * CAP);
    expectSameBytes(f.store.read(f.base.id, 0, CAP), before, 'old range');
    expectSameBytes(f.store.read(f.base.id, CAP, 2 * CAP), Buffer.alloc(2 * CAP), 'new range');
  });
});

describe('idempotent creation by name', () => {
  const changes: Array<[string, (f: Fixture) => Partial<CreateVolumeRequest>]> = [
    ['capacity', () => ({ capacityBytes: 2 * CAP })],
    ['block size', () => ({ blockSize: 8192 })],
    ['attributes', () => ({ attributes: { tier: 'silver' } })],
    ['missing attributes', () => ({ attributes: {} })],
    ['source snapshot', (f) => ({ sourceSnapshotId: f.s1.id })],
    ['source volume', (f) => ({ sourceVolumeId: f.other.id })],
  ];
  test.each(changes)('creating an existing volume name with a different %s is AlreadyExists', async (_what, change) => {
    const f = await fixture();
    const req: CreateVolumeRequest = { name: 'base', capacityBytes: CAP, attributes: { tier: 'gold' }, ...change(f) };
    await refusedWithoutChange(f, () => f.store.createVolume(req), AlreadyExistsError, 'ALREADY_EXISTS');
  });

  test('creating an existing volume name with identical arguments returns the same volume, content intact', async () => {
    const f = await fixture();
    const before = captureState(f.store, f.dir);
    const again = await f.store.createVolume({ name: 'base', capacityBytes: CAP, attributes: { tier: 'gold' } });
    expect(again).toEqual(f.base);
    expect(captureState(f.store, f.dir)).toEqual(before);
  });

  test('a repeat that spells out the default block size is identical to one that omitted it', async () => {
    const f = await fixture();
    const again = await f.store.createVolume({
      name: 'base',
      capacityBytes: CAP,
      blockSize: BLOCK,
      attributes: { tier: 'gold' },
    });
    expect(again.id).toBe(f.base.id);
  });

  test('creating an existing clone name with identical arguments returns the same clone', async () => {
    const f = await fixture();
    const clone = await f.store.createVolume({ name: 'c', sourceSnapshotId: f.s1.id, capacityBytes: CAP });
    f.store.write(clone.id, 0, pattern(11, 100));
    const before = captureState(f.store, f.dir);
    const again = await f.store.createVolume({ name: 'c', sourceSnapshotId: f.s1.id, capacityBytes: CAP });
    expect(again).toEqual(clone);
    expect(captureState(f.store, f.dir)).toEqual(before);
  });

  test('a snapshot name already used on another volume is AlreadyExists', async () => {
    const f = await fixture();
    await refusedWithoutChange(
      f,
      () => f.store.createSnapshot({ volumeId: f.other.id, name: 's1' }),
      AlreadyExistsError,
      'ALREADY_EXISTS',
    );
  });

  test('a snapshot name reused on the same volume returns the same snapshot, even after new writes', async () => {
    const f = await fixture();
    f.store.write(f.base.id, 0, pattern(12, 3 * BLOCK));
    const before = captureState(f.store, f.dir);
    const again = await f.store.createSnapshot({ volumeId: f.base.id, name: 's2' });
    expect(again).toEqual(f.s2);
    const after = captureState(f.store, f.dir) as { snapshots: SnapshotInfo[]; contents: Record<string, string> };
    const prior = before as { snapshots: SnapshotInfo[]; contents: Record<string, string> };
    expect(after.snapshots).toEqual(prior.snapshots);
    expect(after.contents[f.s2.id]).toBe(prior.contents[f.s2.id]);
  });

  test('a snapshot name repeated after its source volume was deleted returns the same snapshot (a retry after the cut)', async () => {
    const f = await fixture();
    const snap = await f.store.createSnapshot({ volumeId: f.other.id, name: 'last-of-other' });
    await f.store.deleteVolume(f.other.id);
    const again = await f.store.createSnapshot({ volumeId: f.other.id, name: 'last-of-other' });
    expect(again).toEqual(snap);
    await expectEngineError(
      () => f.store.createSnapshot({ volumeId: f.other.id, name: 'new' }),
      NotFoundError,
      'NOT_FOUND',
    );
  });
});

describe('delta ordering and relation', () => {
  test('delta between snapshots of unrelated volumes is UnrelatedSnapshots, either way round', async () => {
    const f = await fixture();
    const before = captureState(f.store, f.dir);
    expectThrowsNow(() => f.store.delta(f.s1.id, f.o1.id), UnrelatedSnapshotsError, 'UNRELATED');
    expectThrowsNow(() => f.store.delta(f.o1.id, f.s2.id), UnrelatedSnapshotsError, 'UNRELATED');
    expect(captureState(f.store, f.dir)).toEqual(before);
  });

  test('delta with base and target reversed is UnrelatedSnapshots', async () => {
    const f = await fixture();
    expectThrowsNow(() => f.store.delta(f.s2.id, f.s1.id), UnrelatedSnapshotsError, 'UNRELATED');
    expect((await collect(f.store.delta(f.s1.id, f.s2.id))).length).toBeGreaterThan(0);
  });

  test('delta of a snapshot with itself is empty', async () => {
    const f = await fixture();
    expect(await collect(f.store.delta(f.s2.id, f.s2.id))).toEqual([]);
  });

  test("delta into a clone is defined from the clone's source snapshot, not from a later one", async () => {
    const f = await fixture();
    const clone = await f.store.createVolume({ sourceSnapshotId: f.s1.id, capacityBytes: CAP });
    f.store.write(clone.id, 0, pattern(13, BLOCK));
    const c1 = await f.store.createSnapshot({ volumeId: clone.id });
    expect(await collect(f.store.delta(f.s1.id, c1.id))).toEqual([{ offset: 0, length: BLOCK }]);
    expectThrowsNow(() => f.store.delta(f.s2.id, c1.id), UnrelatedSnapshotsError, 'UNRELATED');
    expectThrowsNow(() => f.store.delta(c1.id, f.s2.id), UnrelatedSnapshotsError, 'UNRELATED');
    expectThrowsNow(() => f.store.delta(c1.id, f.s1.id), UnrelatedSnapshotsError, 'UNRELATED');
  });
});

describe('startingOffset of extent queries', () => {
  test.each([
    ['negative', -1],
    ['one block negative', -BLOCK],
    ['one byte past capacity', CAP + 1],
    ['a block past capacity', CAP + BLOCK],
  ])('a %s startingOffset is OutOfRange for allocated and delta, at call time', async (_what, startingOffset) => {
    const f = await fixture();
    const before = captureState(f.store, f.dir);
    expectThrowsNow(() => f.store.allocated(f.s2.id, { startingOffset }), OutOfRangeError, 'OUT_OF_RANGE');
    expectThrowsNow(() => f.store.delta(f.s1.id, f.s2.id, { startingOffset }), OutOfRangeError, 'OUT_OF_RANGE');
    expect(captureState(f.store, f.dir)).toEqual(before);
  });

  test.each([
    ['a fractional startingOffset', { startingOffset: 4096.5 }],
    ['a NaN startingOffset', { startingOffset: Number.NaN }],
    ['a batchSize of 0', { batchSize: 0 }],
    ['a negative batchSize', { batchSize: -1 }],
    ['a fractional batchSize', { batchSize: 2.5 }],
  ])('%s is InvalidArgument for allocated and delta, at call time', async (_what, options) => {
    const f = await fixture();
    expectThrowsNow(() => f.store.allocated(f.s2.id, options), InvalidArgumentError, 'INVALID_ARGUMENT');
    expectThrowsNow(() => f.store.delta(f.s1.id, f.s2.id, options), InvalidArgumentError, 'INVALID_ARGUMENT');
  });

  test('a startingOffset equal to the capacity is allowed and yields nothing', async () => {
    const f = await fixture();
    expect(await collect(f.store.allocated(f.s2.id, { startingOffset: CAP }))).toEqual([]);
    expect(await collect(f.store.delta(f.s1.id, f.s2.id, { startingOffset: CAP }))).toEqual([]);
  });
});

describe('holders', () => {
  test('deleting a held volume is Busy and changes nothing; after every holder releases it succeeds', async () => {
    const f = await fixture();
    f.store.hold(f.base.id, 'node-a');
    f.store.hold(f.base.id, 'node-b');
    await refusedWithoutChange(f, () => f.store.deleteVolume(f.base.id), BusyError, 'BUSY');
    f.store.release(f.base.id, 'node-a');
    await refusedWithoutChange(f, () => f.store.deleteVolume(f.base.id), BusyError, 'BUSY');
    f.store.release(f.base.id, 'node-b');
    await f.store.deleteVolume(f.base.id);
    expect(f.store.listVolumes().map((v) => v.id)).toEqual([f.other.id]);
    // Its snapshots survive the volume.
    expect(f.store.listSnapshots({ sourceVolumeId: f.base.id }).map((s) => s.id)).toEqual([f.s1.id, f.s2.id]);
  });
});

describe('capacity limit', () => {
  // The fixture provisions base (1 MiB) + other (256 KiB).
  const LIMIT = 4 * MiB;
  const USED = CAP + 256 * KiB;

  test('creating past the limit is NoSpace and creates nothing; up to the limit exactly is allowed', async () => {
    const f = await fixture({ capacityLimitBytes: LIMIT });
    expect(f.store.spaceUsage().capacityLimitBytes).toBe(LIMIT);
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ name: 'x', capacityBytes: LIMIT - USED + BLOCK }),
      NoSpaceError,
      'NO_SPACE',
    );
    const fits = await f.store.createVolume({ name: 'x', capacityBytes: LIMIT - USED });
    expect(f.store.spaceUsage().provisionedBytes).toBe(LIMIT);
    await refusedWithoutChange(f, () => f.store.createVolume({ capacityBytes: BLOCK }), NoSpaceError, 'NO_SPACE');
    // Deleting gives the space back.
    await f.store.deleteVolume(fits.id);
    await f.store.createVolume({ capacityBytes: LIMIT - USED });
  });

  test('a clone past the limit is NoSpace and creates nothing', async () => {
    const f = await fixture({ capacityLimitBytes: LIMIT });
    await f.store.createVolume({ capacityBytes: LIMIT - USED - CAP + BLOCK, blockSize: BLOCK });
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ sourceSnapshotId: f.s1.id, capacityBytes: CAP }),
      NoSpaceError,
      'NO_SPACE',
    );
    await refusedWithoutChange(
      f,
      () => f.store.createVolume({ sourceVolumeId: f.base.id, capacityBytes: CAP }),
      NoSpaceError,
      'NO_SPACE',
    );
  });

  test('growing past the limit is NoSpace and keeps the capacity; growing to the limit is allowed', async () => {
    const f = await fixture({ capacityLimitBytes: LIMIT });
    await refusedWithoutChange(
      f,
      () => f.store.growVolume(f.base.id, CAP + (LIMIT - USED) + BLOCK),
      NoSpaceError,
      'NO_SPACE',
    );
    expect(f.store.getVolume(f.base.id).capacityBytes).toBe(CAP);
    const grown = await f.store.growVolume(f.base.id, CAP + (LIMIT - USED));
    expect(grown.capacityBytes).toBe(CAP + (LIMIT - USED));
    expect(f.store.spaceUsage().provisionedBytes).toBe(LIMIT);
  });
});

describe('closed store', () => {
  // release() is left out: it is an in-memory cleanup a shutting-down data plane may still call.
  test('every operation after close is StoreClosed; close is idempotent; reopening finds everything', async () => {
    const f = await fixture();
    const before = captureState(f.store, f.dir) as Record<string, unknown>;
    await f.store.close();
    await f.store.close();
    const { store, base, s1, s2 } = f;
    const calls: Array<[string, () => unknown]> = [
      ['createVolume', () => store.createVolume({ capacityBytes: CAP })],
      ['getVolume', () => store.getVolume(base.id)],
      ['findVolumeByName', () => store.findVolumeByName('base')],
      ['listVolumes', () => store.listVolumes()],
      ['deleteVolume', () => store.deleteVolume(base.id)],
      ['growVolume', () => store.growVolume(base.id, 2 * CAP)],
      ['write', () => store.write(base.id, 0, pattern(1, 10))],
      ['read', () => store.read(base.id, 0, 10)],
      ['trim', () => store.trim(base.id, 0, BLOCK)],
      ['flush', () => store.flush(base.id)],
      ['createSnapshot', () => store.createSnapshot({ volumeId: base.id })],
      ['getSnapshot', () => store.getSnapshot(s1.id)],
      ['findSnapshotByName', () => store.findSnapshotByName('s1')],
      ['listSnapshots', () => store.listSnapshots()],
      ['deleteSnapshot', () => store.deleteSnapshot(s1.id)],
      ['readSnapshot', () => store.readSnapshot(s1.id, 0, 10)],
      ['allocated', () => store.allocated(s1.id)],
      ['delta', () => store.delta(s1.id, s2.id)],
      ['compact', () => store.compact()],
      ['spaceUsage', () => store.spaceUsage()],
      ['hold', () => store.hold(base.id, 'node-a')],
    ];
    for (const [name, call] of calls) {
      await labelled(name, () => expectEngineError(call, StoreClosedError, 'CLOSED'));
    }
    const reopened = stores.reopen(f.dir, { autoCompact: false });
    const after = captureState(reopened, f.dir) as Record<string, unknown>;
    expect(after).toEqual(before);
  });
});
