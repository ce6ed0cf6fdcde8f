/**
 * How large a volume a store can hold (storage-engine/capacity.ts). Block i of a layer lives at byte
 * i × B of one sparse file, so the state filesystem's largest file bounds every volume: a volume is at
 * most 2^32 blocks, its last block wholly inside that file size, and under the store's provisioning
 * limit if it has one. Past that, create and grow are OutOfRange, naming the limit and the filesystem;
 * capacity() reports the truth. Checked against real filesystems: the test's own temp directory, a
 * tmpfs (which holds files of any size the engine addresses) and a loop-mounted 1 KiB-block ext4 (whose
 * largest file is 4 TiB − 1 KiB).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { MAX_BLOCKS, OutOfRangeError } from '../../storage-engine/index.js';
import {
  MAX_ADDRESSABLE_BYTES,
  PROBE_FILE,
  checkAddressable,
  fileSystemName,
  maximumVolumeBytes,
  probeFileSystem,
  type FileSystemLimits,
} from '../../storage-engine/capacity.js';
import {
  missingSmallFileSystem,
  mountSmallExt4,
  smallFileSystemSuite,
  type SmallFileSystem,
} from '../support/small-filesystem.js';
import {
  GiB,
  KiB,
  MiB,
  TiB,
  caught,
  expectEngineError,
  expectSameBytes,
  pattern,
  useTempStores,
} from './support/example-support.js';

const stores = useTempStores();

/** Whether a file of `bytes` can exist in `dir`: the kernel's own answer, asked directly. */
function fileOfSizeFits(dir: string, bytes: number): boolean {
  const file = path.join(dir, 'size-check');
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, bytes);
    return true;
  } catch {
    return false;
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file);
  }
}

describe('the rules, on given filesystem limits', () => {
  const ext4 = (maxFileBytes: number): FileSystemLimits => ({ dir: '/state', type: 'ext4', maxFileBytes });
  const unlimited = { capacityLimitBytes: undefined, provisionedBytes: 0 };

  test('a filesystem that holds any file the engine addresses allows 2^32 blocks of every block size', () => {
    for (const B of [4 * KiB, 64 * KiB, MiB]) {
      expect(maximumVolumeBytes(ext4(MAX_ADDRESSABLE_BYTES), unlimited, B)).toBe(MAX_BLOCKS * B);
    }
  });

  test("ext4's largest file at 4 KiB blocks (16 TiB − 4 KiB) allows 2^32 − 1 blocks of 4 KiB, and 16 TiB − 64 KiB at 64 KiB", () => {
    const limits = ext4(16 * TiB - 4 * KiB);
    expect(maximumVolumeBytes(limits, unlimited, 4 * KiB)).toBe((MAX_BLOCKS - 1) * 4 * KiB);
    expect(maximumVolumeBytes(limits, unlimited, 64 * KiB)).toBe(16 * TiB - 64 * KiB);
  });

  test('with a provisioning limit, the largest volume is also no more than what is left under it, in whole blocks', () => {
    const limits = ext4(MAX_ADDRESSABLE_BYTES);
    expect(maximumVolumeBytes(limits, { capacityLimitBytes: 10 * GiB, provisionedBytes: 4 * GiB }, 4 * KiB)).toBe(
      6 * GiB,
    );
    expect(maximumVolumeBytes(limits, { capacityLimitBytes: 10 * GiB, provisionedBytes: 4 * GiB + 1 }, MiB)).toBe(
      6 * GiB - MiB,
    );
    expect(maximumVolumeBytes(limits, { capacityLimitBytes: 10 * GiB, provisionedBytes: 12 * GiB }, 4 * KiB)).toBe(0);
  });

  test('checkAddressable accepts the largest size and refuses one block more with OutOfRange naming the limit and the filesystem', () => {
    const limits = ext4(16 * TiB - 4 * KiB);
    expect(() => checkAddressable(limits, 16 * TiB - 4 * KiB, 4 * KiB)).not.toThrow();
    let err: unknown;
    try {
      checkAddressable(limits, 16 * TiB, 4 * KiB);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(OutOfRangeError);
    const message = (err as Error).message;
    expect(message).toContain(String(16 * TiB - 4 * KiB));
    expect(message).toContain('ext4');
    expect(message).toContain('/state');
  });

  test('filesystem names come from the statfs magic; unknown ones are shown in hex', () => {
    expect(fileSystemName(0xef53)).toBe('ext4');
    expect(fileSystemName(0x01021994)).toBe('tmpfs');
    expect(fileSystemName(0x1234)).toBe('filesystem 0x1234');
  });
});

describe('the probe', () => {
  test("finds the largest file the temp directory's filesystem accepts: that size fits, one byte more does not (or it is the engine's bound)", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-probe-'));
    try {
      const limits = probeFileSystem(dir);
      expect(limits.maxFileBytes).toBeGreaterThan(0);
      expect(limits.maxFileBytes).toBeLessThanOrEqual(MAX_ADDRESSABLE_BYTES);
      expect(fileOfSizeFits(dir, limits.maxFileBytes)).toBe(true);
      if (limits.maxFileBytes < MAX_ADDRESSABLE_BYTES) expect(fileOfSizeFits(dir, limits.maxFileBytes + 1)).toBe(false);
      expect(limits.type).toBe(fileSystemName(fs.statfsSync(dir).type));
      // It leaves nothing behind, and replaces a scratch file a crash left.
      expect(fs.readdirSync(dir)).toEqual([]);
      fs.writeFileSync(path.join(dir, PROBE_FILE), 'left by a crash');
      expect(probeFileSystem(dir).maxFileBytes).toBe(limits.maxFileBytes);
      expect(fs.readdirSync(dir)).toEqual([]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a store leaves no scratch file in its directory after opening', () => {
    const { dir } = stores.open();
    expect(fs.existsSync(path.join(dir, PROBE_FILE))).toBe(false);
  });
});

describe("the temp directory's filesystem", () => {
  test('capacity() reports the largest volume per the rules and the free space of the filesystem', () => {
    const { store, dir } = stores.open();
    const limits = probeFileSystem(dir);
    for (const B of [4 * KiB, 64 * KiB, MiB]) {
      const c = store.capacity(B);
      expect(c.maximumVolumeBytes).toBe(Math.min(MAX_BLOCKS * B, Math.floor(limits.maxFileBytes / B) * B));
      const stats = fs.statfsSync(dir);
      // Other tests write meanwhile: it must be this filesystem's free space, give or take.
      expect(Math.abs(c.availableBytes - stats.bavail * stats.bsize)).toBeLessThan(256 * MiB);
      expect(c.availableBytes % B).toBe(0);
    }
  });

  test('a volume of exactly the largest size is created, and its last block is written and read back', async () => {
    const { store } = stores.open();
    const B = 4 * KiB;
    const largest = store.capacity(B).maximumVolumeBytes;
    const v = await store.createVolume({ capacityBytes: largest, blockSize: B });
    const data = pattern(7, B);
    store.write(v.id, largest - B, data);
    await store.flush(v.id);
    expectSameBytes(store.read(v.id, largest - B, B), data, 'last block');
  });

  test('one block more than the largest size is OutOfRange for create and for grow, and changes nothing', async () => {
    const { store } = stores.open();
    const B = 4 * KiB;
    const largest = store.capacity(B).maximumVolumeBytes;
    await expectEngineError(
      () => store.createVolume({ name: 'huge', capacityBytes: largest + B, blockSize: B }),
      OutOfRangeError,
      'OUT_OF_RANGE',
    );
    expect(store.findVolumeByName('huge')).toBeUndefined();
    const v = await store.createVolume({ capacityBytes: GiB, blockSize: B });
    await expectEngineError(() => store.growVolume(v.id, largest + B), OutOfRangeError, 'OUT_OF_RANGE');
    expect(store.getVolume(v.id).capacityBytes).toBe(GiB);
    expect((await store.growVolume(v.id, largest)).capacityBytes).toBe(largest);
  });

  test('with a provisioning limit, capacity() reports what is left under it, and the largest volume no more than that', async () => {
    const { store } = stores.open({ capacityLimitBytes: 64 * MiB });
    await store.createVolume({ capacityBytes: 24 * MiB });
    expect(store.capacity(4 * KiB)).toEqual({ availableBytes: 40 * MiB, maximumVolumeBytes: 40 * MiB });
    expect(store.capacity(MiB)).toEqual({ availableBytes: 40 * MiB, maximumVolumeBytes: 40 * MiB });
  });

  test('capacity() of an invalid block size is InvalidArgument', async () => {
    const { store } = stores.open();
    const err = await caught(() => store.capacity(3000));
    expect((err as { code?: string }).code).toBe('INVALID_ARGUMENT');
  });
});

describe('a tmpfs state filesystem (files of any size the engine addresses)', () => {
  let dir: string | undefined;
  const missing = missingSmallFileSystem('mount');
  beforeAll(() => {
    if (missing) return;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-tmpfs-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m,mode=0700', 'tmpfs', dir]);
  });
  afterAll(() => {
    if (!dir) return;
    execFileSync('umount', [dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  afterEach(() => {
    if (dir)
      for (const entry of fs.readdirSync(dir)) fs.rmSync(path.join(dir, entry), { recursive: true, force: true });
  });

  test.skipIf(missing !== undefined && process.env.CI !== 'true')(
    `exactly 2^32 blocks is the largest volume (inclusive): created, last block written and read back${missing ? ` (skipped: ${missing})` : ''}`,
    async () => {
      if (!dir) throw new Error(`CI=true but tmpfs cannot be mounted: ${missing}`);
      const store = stores.reopen(path.join(dir, 'store'));
      for (const B of [4 * KiB, MiB]) expect(store.capacity(B).maximumVolumeBytes).toBe(MAX_BLOCKS * B);
      const B = 4 * KiB;
      const v = await store.createVolume({ capacityBytes: MAX_BLOCKS * B, blockSize: B });
      const data = pattern(11, B);
      store.write(v.id, MAX_BLOCKS * B - B, data);
      await store.flush(v.id);
      expectSameBytes(store.read(v.id, MAX_BLOCKS * B - B, B), data, 'last block');
      await expectEngineError(
        () => store.createVolume({ capacityBytes: (MAX_BLOCKS + 1) * B, blockSize: B }),
        OutOfRangeError,
        'OUT_OF_RANGE',
      );
    },
  );
});

smallFileSystemSuite('a 64 MiB ext4 with 1 KiB blocks as the state filesystem (largest file 4 TiB − 1 KiB)', () => {
  let small: SmallFileSystem;
  beforeAll(() => {
    small = mountSmallExt4({ sizeBytes: 64 * MiB, blockSize: 1024 });
  });
  afterAll(() => small?.remove());
  afterEach(() => {
    for (const entry of fs.readdirSync(small.dir)) {
      if (entry !== 'lost+found') fs.rmSync(path.join(small.dir, entry), { recursive: true, force: true });
    }
  });
  const open = (options = {}) => stores.reopen(path.join(small.dir, 'store'), options);

  test("the probe finds the kernel's limit for 1 KiB-block ext4: 4 TiB − 1 KiB", () => {
    const limits = probeFileSystem(small.dir);
    expect(limits).toEqual({ dir: small.dir, type: 'ext4', maxFileBytes: 4 * TiB - KiB });
    expect(fileOfSizeFits(small.dir, 4 * TiB - KiB)).toBe(true);
    expect(fileOfSizeFits(small.dir, 4 * TiB - KiB + 1)).toBe(false);
  });

  test('the largest volume is 4 TiB − 4 KiB at 4 KiB blocks and 4 TiB − 1 MiB at 1 MiB blocks, not 2^32 blocks', () => {
    const store = open();
    expect(store.capacity(4 * KiB).maximumVolumeBytes).toBe(4 * TiB - 4 * KiB);
    expect(store.capacity(MiB).maximumVolumeBytes).toBe(4 * TiB - MiB);
  });

  test('a volume of the largest size works to its last block; one block more is OutOfRange naming ext4 and the limit', async () => {
    const store = open();
    const B = 4 * KiB;
    const largest = 4 * TiB - 4 * KiB;
    const v = await store.createVolume({ name: 'largest', capacityBytes: largest, blockSize: B });
    const data = pattern(3, B);
    store.write(v.id, largest - B, data);
    await store.flush(v.id);
    expectSameBytes(store.read(v.id, largest - B, B), data, 'last block');

    const err = await caught(() => store.createVolume({ name: 'too-big', capacityBytes: 4 * TiB, blockSize: B }));
    expect(err).toBeInstanceOf(OutOfRangeError);
    expect((err as Error).message).toContain('ext4');
    expect((err as Error).message).toContain(String(4 * TiB - KiB));
    expect(store.findVolumeByName('too-big')).toBeUndefined();
  });

  test('growing past the largest size is OutOfRange and leaves the volume as it was', async () => {
    const store = open();
    const v = await store.createVolume({ capacityBytes: GiB, blockSize: 64 * KiB });
    await expectEngineError(() => store.growVolume(v.id, 4 * TiB), OutOfRangeError, 'OUT_OF_RANGE');
    expect(store.getVolume(v.id).capacityBytes).toBe(GiB);
    expect((await store.growVolume(v.id, 4 * TiB - 64 * KiB)).capacityBytes).toBe(4 * TiB - 64 * KiB);
  });

  test('available bytes are the free space of this filesystem, and go down as data is written', async () => {
    const store = open();
    const B = 4 * KiB;
    const stats = fs.statfsSync(small.dir);
    const before = store.capacity(B).availableBytes;
    expect(before).toBe(Math.floor((stats.bavail * stats.bsize) / B) * B);
    expect(before).toBeLessThan(64 * MiB);
    const v = await store.createVolume({ capacityBytes: 64 * MiB, blockSize: B });
    store.write(v.id, 0, pattern(5, 16 * MiB));
    await store.flush(v.id);
    const after = store.capacity(B).availableBytes;
    expect(before - after).toBeGreaterThanOrEqual(16 * MiB);
    expect(before - after).toBeLessThan(20 * MiB);
  });
});
