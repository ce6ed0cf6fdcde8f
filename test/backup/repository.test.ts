/**
 * The repository's own rules, without a driver: identical chunks stored once; small extents share a chunk
 * and restore from their place in it; verify reports a damaged or missing chunk with every backup it
 * breaks; restore refuses a damaged chunk; a volume that grew between backups restores at its new size;
 * manifests of format 1 still restore; files 0600 and directories 0700 whatever the umask.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { chunksOf, CHUNK_SIZE } from '../../src/backup/backup-run.js';
import { allocAligned, createFile } from '../../src/backup/direct-io.js';
import { BackupRepository, RepositoryError } from '../../src/backup/repository.js';
import { createProgress } from '../../src/backup/progress.js';
import { restoreBackup } from '../../src/backup/restore.js';
import { Sha256Threads } from '../../src/backup/sha256-threads.js';
import type { Manifest } from '../../src/backup/manifest.js';
import { commitBackup, tempDirPerTest } from './support/repository.js';
import { looserThanPrivate } from './support/volumes.js';

const MiB = 2 ** 20;
const tempDir = tempDirPerTest('cbt-repo-');
let dir: string;
beforeEach(() => {
  dir = tempDir();
});

/** Commits a backup of `writes` (offset → bytes, a chunk each) on `base`. */
function backup(
  repo: BackupRepository,
  capacityBytes: number,
  writes: [number, Buffer][],
  base: Manifest | null,
): Promise<Manifest> {
  return commitBackup(
    repo,
    capacityBytes,
    writes.map((w) => [w]),
    base,
    MiB,
  );
}

const quiet = createProgress('quiet');

describe('backup repository', () => {
  it('stores identical chunks once, in private files and directories (umask 0)', async () => {
    const old = process.umask(0);
    try {
      const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
      const same = randomBytes(MiB);
      await backup(
        repo,
        8 * MiB,
        [
          [0, same],
          [MiB, same],
          [4 * MiB, Buffer.from(same)],
        ],
        null,
      );
      const chunks = fs
        .readdirSync(path.join(repo.dir, 'chunks'))
        .flatMap((d) => fs.readdirSync(path.join(repo.dir, 'chunks', d)));
      expect(chunks).toHaveLength(1);
      expect(looserThanPrivate(repo.dir)).toEqual([]);
    } finally {
      process.umask(old);
    }
  });

  it('verify names a damaged or missing chunk with every backup whose chain needs it; restore refuses it', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    const a = randomBytes(4096);
    const b = randomBytes(4096);
    const c = randomBytes(4096);
    const full = await backup(repo, 4 * MiB, [[0, a]], null);
    const inc1 = await backup(repo, 4 * MiB, [[8192, b]], full);
    const inc2 = await backup(repo, 4 * MiB, [[16384, c]], inc1);
    const other = await backup(repo, 4 * MiB, [[0, c]], null);
    expect((await repo.verify()).damaged).toEqual([]);

    const [, , hashB] = inc1.extents[0]!;
    const bytes = fs.readFileSync(repo.chunkPath(hashB));
    bytes[100]! ^= 1;
    fs.writeFileSync(repo.chunkPath(hashB), bytes);
    const report = await repo.verify();
    expect(report.damaged).toEqual([{ chunk: hashB, problem: 'hash mismatch', breaks: [inc1.id, inc2.id].sort() }]);
    // The damaged chunk was read and checked too: every chunk's bytes count.
    expect(report.bytesChecked).toBe(3 * 4096);
    // The full backup does not need it, nor does the unrelated one.
    expect((await repo.verify([full.id])).damaged).toEqual([]);
    const err = await restoreBackup(repo, inc2.id, path.join(dir, 'out.img'), quiet).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RepositoryError);
    expect((err as Error).message).toContain(hashB);

    const [, , hashA] = full.extents[0]!;
    fs.rmSync(repo.chunkPath(hashA));
    const missing = (await repo.verify()).damaged.find((d) => d.chunk === hashA);
    expect(missing).toEqual({ chunk: hashA, problem: 'missing', breaks: [full.id, inc1.id, inc2.id].sort() });
    expect(other.base).toBeNull();
  });

  it('a verify that fails (a hash thread lost) reads no further chunk once it has failed', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    await backup(
      repo,
      MiB,
      Array.from({ length: 64 }, (_, i): [number, Buffer] => [i * 4096, randomBytes(4096)]),
      null,
    );
    let loads = 0;
    let loadsAtLoss = -1;
    const loadChunk = repo.loadChunk.bind(repo);
    // Reads slower than hashes, as on a busy disk: when the thread is lost, the other readers are mid-read.
    repo.loadChunk = async (hash, into, hasher) => {
      if (++loads > 1) await new Promise((r) => setTimeout(r, 200));
      return loadChunk(hash, into, hasher);
    };
    const lost = vi.spyOn(Sha256Threads.prototype, 'hash').mockImplementationOnce(async () => {
      loadsAtLoss = loads;
      throw new Error('a SHA-256 thread exited with code 1');
    });
    try {
      await expect(repo.verify()).rejects.toThrow('SHA-256 thread');
      // Time for any reader still going to read on.
      await new Promise((r) => setTimeout(r, 500));
    } finally {
      lost.mockRestore();
    }
    expect(loads).toBe(loadsAtLoss);
  });

  it('restores a volume that grew between backups at its new size, the new range as written or zero', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    const a = randomBytes(MiB);
    const b = randomBytes(8192);
    const full = await backup(repo, 4 * MiB, [[MiB, a]], null);
    const grown = await backup(repo, 8 * MiB, [[6 * MiB, b]], full);
    const expected = Buffer.alloc(8 * MiB);
    a.copy(expected, MiB);
    b.copy(expected, 6 * MiB);
    const target = path.join(dir, 'grown.img');
    await restoreBackup(repo, grown.id, target, quiet);
    expect(fs.readFileSync(target).equals(expected)).toBe(true);
    // Onto an existing, dirty, larger file: every byte of the volume is written, zeros included.
    const dirty = path.join(dir, 'dirty.img');
    fs.writeFileSync(dirty, Buffer.alloc(9 * MiB, 0xff));
    await restoreBackup(repo, grown.id, dirty, quiet);
    expect(
      fs
        .readFileSync(dirty)
        .subarray(0, 8 * MiB)
        .equals(expected),
    ).toBe(true);
  });

  it('packs small extents into shared chunks: each restores from its offset in the chunk, one file per chunk size', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    const capacity = 64 * MiB;
    // 1,500 scattered 4 KiB blocks (more than a chunk's worth) and one whole aligned chunk, as an
    // incremental's runs.
    const blocks = [...new Set(Array.from({ length: 1500 }, (_, i) => ((i * 7919) % 8000) + 16))].sort((a, b) => a - b);
    expect(blocks.length * 4096).toBeGreaterThan(CHUNK_SIZE);
    const runs = [
      ...blocks.map((b) => ({ offset: b * 4096, length: 4096 })),
      { offset: 8 * CHUNK_SIZE, length: CHUNK_SIZE },
    ];
    const expected = Buffer.alloc(capacity);
    const lock = await repo.lock();
    let manifest: Manifest;
    try {
      const w = await repo.begin(
        {
          snapshot: 'snap-a',
          sourceVolume: 'vol-1',
          base: null,
          capacityBytes: capacity,
          blockSize: CHUNK_SIZE,
          toolVersion: 'test',
        },
        lock,
      );
      for (const chunk of chunksOf(runs)) {
        const data = Buffer.concat(chunk.map((e) => randomBytes(e.length)));
        let at = 0;
        for (const e of chunk) {
          data.copy(expected, e.offset, at, at + e.length);
          at += e.length;
        }
        await w.putChunk(chunk, data);
      }
      manifest = await w.commit();
    } finally {
      await lock.release();
    }
    const files = fs
      .readdirSync(path.join(repo.dir, 'chunks'))
      .flatMap((d) => fs.readdirSync(path.join(repo.dir, 'chunks', d)));
    // The small extents fill shared chunks to the chunk size; the whole chunk is stored on its own.
    expect(files).toHaveLength(Math.ceil((blocks.length * 4096) / CHUNK_SIZE) + 1);
    expect(manifest.format).toBe(2);
    expect(manifest.extents).toHaveLength(blocks.length + 1);
    expect(manifest.extents.some(([, , , chunkOffset]) => chunkOffset > 0)).toBe(true);
    const target = path.join(dir, 'packed.img');
    await restoreBackup(repo, manifest.id, target, quiet);
    expect(fs.readFileSync(target).equals(expected)).toBe(true);
    expect((await repo.verify()).damaged).toEqual([]);
  });

  it('restore reads each chunk once when whole chunks sit between the extents of a shared one', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    const capacity = 4 * CHUNK_SIZE;
    // The ends of a run around two whole chunks: both ends share a chunk, the whole ones lie between them.
    const runs = [{ offset: CHUNK_SIZE - 8192, length: 2 * CHUNK_SIZE + 16384 }];
    const chunks = [...chunksOf(runs)];
    expect(chunks.map((c) => c.length)).toEqual([1, 1, 2]);
    const expected = Buffer.alloc(capacity);
    const lock = await repo.lock();
    let manifest: Manifest;
    try {
      const w = await repo.begin(
        {
          snapshot: 'snap-ends',
          sourceVolume: 'vol-1',
          base: null,
          capacityBytes: capacity,
          blockSize: CHUNK_SIZE,
          toolVersion: 'test',
        },
        lock,
      );
      for (const chunk of chunks) {
        const data = randomBytes(chunk.reduce((n, e) => n + e.length, 0));
        let at = 0;
        for (const e of chunk) {
          data.copy(expected, e.offset, at, at + e.length);
          at += e.length;
        }
        await w.putChunk(chunk, data);
      }
      manifest = await w.commit();
    } finally {
      await lock.release();
    }
    const reads: string[] = [];
    const loadChunk = repo.loadChunk.bind(repo);
    repo.loadChunk = (hash, into, hasher) => {
      reads.push(hash);
      return loadChunk(hash, into, hasher);
    };
    const target = path.join(dir, 'ends.img');
    await restoreBackup(repo, manifest.id, target, quiet);
    expect(fs.readFileSync(target).equals(expected)).toBe(true);
    expect(reads).toHaveLength(3);
  });

  it('commit fsyncs each new chunk file: one that cannot be made durable fails the commit, and no manifest appears', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    const lock = await repo.lock();
    try {
      const w = await repo.begin(
        {
          snapshot: 'snap-lost',
          sourceVolume: 'vol-1',
          base: null,
          capacityBytes: 4 * CHUNK_SIZE,
          blockSize: CHUNK_SIZE,
          toolVersion: 'test',
        },
        lock,
      );
      const data = randomBytes(64 * 1024);
      // The file goes away before its fsync could run (the syncer starts it in the background).
      const rename = fs.promises.rename;
      fs.promises.rename = async (from, to) => {
        await rename(from, to);
        await fs.promises.rm(to);
      };
      try {
        await w.put(0, data);
      } finally {
        fs.promises.rename = rename;
      }
      await expect(w.commit()).rejects.toMatchObject({ code: 'ENOENT' });
    } finally {
      await lock.release();
    }
    expect(await repo.backupIds()).toEqual([]);
  });

  it('chunksOf: whole aligned pieces alone, smaller ones packed in order up to the chunk size, every byte once', () => {
    const runs = [
      { offset: 4096, length: 8192 },
      { offset: CHUNK_SIZE - 4096, length: CHUNK_SIZE + 8192 },
      { offset: 5 * CHUNK_SIZE, length: 3 * 4096 },
    ];
    const chunks = [...chunksOf(runs)];
    expect(chunks).toEqual([
      [{ offset: CHUNK_SIZE, length: CHUNK_SIZE }],
      [
        { offset: 4096, length: 8192 },
        { offset: CHUNK_SIZE - 4096, length: 4096 },
        { offset: 2 * CHUNK_SIZE, length: 4096 },
        { offset: 5 * CHUNK_SIZE, length: 3 * 4096 },
      ],
    ]);
    // Scattered 4 KiB pieces: a chunk's worth fill a chunk exactly, the rest start the next.
    const perChunk = CHUNK_SIZE / 4096;
    const many = [
      ...chunksOf(Array.from({ length: perChunk + 44 }, (_, i) => ({ offset: i * 2 * 4096, length: 4096 }))),
    ];
    expect(many.map((c) => c.length)).toEqual([perChunk, 44]);
  });

  it('restores a format 1 manifest (three-element extents, a chunk each)', async () => {
    const repo = await BackupRepository.openOrCreate(path.join(dir, 'repo'));
    const a = randomBytes(8192);
    const m = await backup(repo, 4 * MiB, [[MiB, a]], null);
    const file = path.join(repo.dir, 'backups', `${m.id}.json`);
    const old = JSON.parse(fs.readFileSync(file, 'utf8')) as { format: number; extents: unknown[][] };
    old.format = 1;
    old.extents = old.extents.map((e) => e.slice(0, 3));
    fs.writeFileSync(file, JSON.stringify(old));
    const target = path.join(dir, 'old.img');
    await restoreBackup(repo, m.id, target, quiet);
    expect(
      fs
        .readFileSync(target)
        .subarray(MiB, MiB + 8192)
        .equals(a),
    ).toBe(true);
    // A format 2 manifest with three-element extents is damaged, not silently read.
    fs.writeFileSync(file, JSON.stringify({ ...old, format: 2 }));
    await expect(repo.manifest(m.id)).rejects.toThrow(/bad extent/);
  });

  it('chunk files: aligned buffers go to disk with O_DIRECT where the filesystem takes it, others through the page cache; 0600 either way', async () => {
    const old = process.umask(0o022);
    try {
      const [aligned] = allocAligned(64 * 1024, 1);
      randomBytes(64 * 1024).copy(aligned!);
      const direct = path.join(dir, 'direct');
      // This machine's /tmp (ext4) takes O_DIRECT; a filesystem that refuses it gets the fallback, which the
      // odd-length case below exercises.
      await createFile(direct, aligned!, 0o600, true);
      expect(fs.readFileSync(direct).equals(aligned!)).toBe(true);
      const odd = path.join(dir, 'odd');
      expect(await createFile(odd, aligned!.subarray(0, 1000), 0o600, true)).toBe(true);
      expect(fs.readFileSync(odd).equals(aligned!.subarray(0, 1000))).toBe(true);
      const plain = path.join(dir, 'plain');
      expect(await createFile(plain, Buffer.from(aligned!), 0o600, false)).toBe(false);
      expect(fs.readFileSync(plain).equals(aligned!)).toBe(true);
      for (const f of [direct, odd, plain]) expect(fs.statSync(f).mode & 0o777).toBe(0o600);
      await expect(createFile(direct, aligned!, 0o600, true)).rejects.toMatchObject({ code: 'EEXIST' });
    } finally {
      process.umask(old);
    }
  });
});

/** Why a ramfs (a filesystem that refuses O_DIRECT) cannot be mounted here, or undefined if it can. */
function missingRamfs(): string | undefined {
  if (process.platform !== 'linux') return 'ramfs is Linux';
  if (process.getuid?.() !== 0) return 'mounting a ramfs needs root';
  return undefined;
}

const ramfsMissing = missingRamfs();
const onRamfs = ramfsMissing === undefined || process.env.CI === 'true' ? describe : describe.skip;

onRamfs(
  `a repository on a filesystem that refuses O_DIRECT (ramfs)${ramfsMissing ? ` — skipped: ${ramfsMissing}` : ''}`,
  () => {
    let mnt: string;
    beforeEach(() => {
      if (ramfsMissing) throw new Error(`CI=true: ${ramfsMissing}`);
      mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-ramfs-'));
      execFileSync('mount', ['-t', 'ramfs', '-o', 'mode=0700', 'ramfs', mnt], { stdio: 'pipe' });
    });
    afterEach(() => {
      if (!mnt) return;
      execFileSync('umount', [mnt], { stdio: 'pipe' });
      fs.rmSync(mnt, { recursive: true, force: true });
    });

    it('chunk files fall back to the page cache: the open O_DIRECT refused leaves no file, the backup commits, restores and verifies', async () => {
      const probe = path.join(mnt, 'probe');
      const [aligned] = allocAligned(64 * 1024, 1);
      randomBytes(64 * 1024).copy(aligned!);
      // The refused open has already made the file; the fallback removes it and writes it again, 0600.
      expect(await createFile(probe, aligned!, 0o600, true)).toBe(false);
      expect(fs.readFileSync(probe).equals(aligned!)).toBe(true);
      expect(fs.statSync(probe).mode & 0o777).toBe(0o600);

      const repo = await BackupRepository.openOrCreate(path.join(mnt, 'repo'));
      const capacity = 4 * CHUNK_SIZE;
      const buffers = allocAligned(CHUNK_SIZE, 2);
      const expected = Buffer.alloc(capacity);
      const lock = await repo.lock();
      let manifest: Manifest;
      try {
        const w = await repo.begin(
          {
            snapshot: 'snap-ramfs',
            sourceVolume: 'vol-1',
            base: null,
            capacityBytes: capacity,
            blockSize: CHUNK_SIZE,
            toolVersion: 'test',
          },
          lock,
        );
        for (const [i, at] of [CHUNK_SIZE, 3 * CHUNK_SIZE].entries()) {
          randomBytes(CHUNK_SIZE).copy(buffers[i]!);
          buffers[i]!.copy(expected, at);
          await w.put(at, buffers[i]!);
        }
        manifest = await w.commit();
      } finally {
        await lock.release();
      }
      expect(fs.readdirSync(repo.tmpDir)).toEqual([]);
      const target = path.join(dir, 'from-ramfs.img');
      await restoreBackup(repo, manifest.id, target, quiet);
      expect(fs.readFileSync(target).equals(expected)).toBe(true);
      const report = await repo.verify();
      expect(report.damaged).toEqual([]);
      expect(report.chunksChecked).toBe(2);
    });
  },
);
