/**
 * Restore writes the volume a chain leaves, each byte once, whatever the chain's shape: a long chain whose
 * shared chunks each hold blocks from all over the volume is restored exactly even though its chunks do not
 * all fit in memory at once (those let go are read, and checked, again). Ctrl-C stops a restore or a verify
 * where it is, and verify says how much it will check before it starts.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect, it, vi } from 'vitest';
import type { Manifest } from '../../src/backup/manifest.js';
import { createProgress } from '../../src/backup/progress.js';
import { BackupRepository } from '../../src/backup/repository.js';
import { restoreBackup } from '../../src/backup/restore.js';
import { commitBackup, tempDirPerTest } from './support/repository.js';

const KiB = 1024;
const quiet = createProgress('quiet');
const dir = tempDirPerTest('cbt-restore-');

/** commitBackup with 64 KiB blocks, applying each chunk's pieces to `volume` (the expected content). */
function backup(
  repo: BackupRepository,
  volume: Buffer,
  chunks: [number, Buffer][][],
  base: Manifest | null,
): Promise<Manifest> {
  for (const pieces of chunks) for (const [offset, data] of pieces) data.copy(volume, offset);
  return commitBackup(repo, volume.length, chunks, base, 64 * KiB);
}

/** A full backup of a 1 MiB volume in 16 whole 64 KiB chunks of random bytes, and the volume it holds. */
async function randomFull(repo: BackupRepository): Promise<{ volume: Buffer; full: Manifest }> {
  const volume = Buffer.alloc(1024 * KiB);
  const full = await backup(
    repo,
    volume,
    Array.from({ length: 16 }, (_, i) => [[i * 64 * KiB, randomBytes(64 * KiB)]]),
    null,
  );
  return { volume, full };
}

it('restoring a full backup and an incremental writes each byte of the volume once', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  const { volume, full } = await randomFull(repo);
  const inc = await backup(
    repo,
    volume,
    [
      [
        [100 * KiB, randomBytes(4 * KiB)],
        [700 * KiB + 3, randomBytes(999)],
      ],
    ],
    full,
  );
  const target = path.join(dir(), 'out.img');
  const summary = await restoreBackup(repo, inc.id, target, quiet);
  expect(fs.readFileSync(target).equals(volume)).toBe(true);
  // Replaying the chain would write 1 MiB and then the incremental's 5,095 bytes again.
  expect(summary.bytesWritten).toBe(volume.length);
  expect(summary.chain).toEqual([full.id, inc.id]);
});

it('a long chain whose shared chunks span the volume restores exactly; chunks let go are read again', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  const blocks = 256;
  const volume = Buffer.alloc(blocks * 4 * KiB);
  let last = await backup(
    repo,
    volume,
    Array.from({ length: blocks / 16 }, (_, i) => [[i * 64 * KiB, randomBytes(64 * KiB)]]),
    null,
  );
  // 24 incrementals (more than a restore holds in memory), each one shared chunk of 8 blocks spread over
  // the whole volume, so every one of them is needed again far on while the others are.
  for (let n = 0; n < 24; n++) {
    const picked = [...new Set(Array.from({ length: 8 }, (_, j) => (n * 7 + j * 31) % blocks))].sort((a, b) => a - b);
    last = await backup(repo, volume, [picked.map((b) => [b * 4 * KiB, randomBytes(4 * KiB)])], last);
  }
  const loads = new Map<string, number>();
  const loadChunk = repo.loadChunk.bind(repo);
  repo.loadChunk = (hash, into, hasher) => {
    loads.set(hash, (loads.get(hash) ?? 0) + 1);
    return loadChunk(hash, into, hasher);
  };
  const target = path.join(dir(), 'out.img');
  await restoreBackup(repo, last.id, target, quiet);
  expect(fs.readFileSync(target).equals(volume)).toBe(true);
  expect(Math.max(...loads.values())).toBeGreaterThan(1);
});

/** A full backup of `chunks` distinct 64 KiB chunks. */
async function fullOf(repo: BackupRepository, chunks: number): Promise<Manifest> {
  const volume = Buffer.alloc(chunks * 64 * KiB);
  return backup(
    repo,
    volume,
    Array.from({ length: chunks }, (_, i) => [[i * 64 * KiB, Buffer.alloc(64 * KiB, i % 251).fill(i >> 8, 0, 8)]]),
    null,
  );
}

it('an interrupted restore stops at the next write, and an interrupted verify at the next chunk', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  const full = await fullOf(repo, 256);
  const stopped = new AbortController();
  let added = 0;
  const progress = {
    start() {},
    add() {
      if (++added === 1) stopped.abort(new Error('interrupted'));
    },
    stop() {},
  };
  await expect(restoreBackup(repo, full.id, path.join(dir(), 'out.img'), progress, stopped.signal)).rejects.toThrow(
    'interrupted',
  );
  // At most the writes already under way when it was stopped.
  expect(added).toBeLessThan(32);

  const checking = new AbortController();
  let checked = 0;
  await expect(
    repo.verify(
      undefined,
      {
        total() {},
        add() {
          if (++checked === 1) checking.abort(new Error('interrupted'));
        },
      },
      checking.signal,
    ),
  ).rejects.toThrow('interrupted');
  expect(checked).toBeLessThan(32);
});

it('verify says up front how many bytes it will check', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  await fullOf(repo, 8);
  let total = -1;
  let added = 0;
  const report = await repo.verify(undefined, { total: (t) => (total = t), add: (n) => (added += n) });
  expect(total).toBe(8 * 64 * KiB);
  expect(added).toBe(total);
  expect(report.bytesChecked).toBe(total);
});

it('a target that opens with O_DIRECT but refuses its writes gets every byte through the page cache, also when several writes are refused at once', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  // 16 whole aligned chunks: their ranges go with O_DIRECT, 8 writes at once.
  const { volume, full } = await randomFull(repo);
  // A filesystem that takes O_DIRECT at open but refuses the writes (EINVAL), as some do.
  const open = fs.promises.open;
  const spy = vi.spyOn(fs.promises, 'open').mockImplementation(async (file, flags, mode) => {
    const handle = await open(file, flags, mode);
    if (typeof flags === 'number' && (flags & fs.constants.O_DIRECT) !== 0)
      handle.write = (async () => {
        await new Promise((r) => setImmediate(r));
        throw Object.assign(new Error('EINVAL: invalid argument, write'), { code: 'EINVAL' });
      }) as typeof handle.write;
    return handle;
  });
  const target = path.join(dir(), 'out.img');
  try {
    await restoreBackup(repo, full.id, target, quiet);
  } finally {
    spy.mockRestore();
  }
  expect(fs.readFileSync(target).equals(volume)).toBe(true);
});

it('without WebAssembly (node --jitless) ranges no backup stored are still written with zeros', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  const volume = Buffer.alloc(1024 * KiB);
  const full = await backup(repo, volume, [[[256 * KiB, randomBytes(64 * KiB)]]], null);
  // A fresh restore module as node --jitless loads it: no WebAssembly, so its aligned buffers are plain
  // ones, whose memory Node does not clear (here: memory as a process that ran a while leaves it).
  vi.resetModules();
  vi.stubGlobal('WebAssembly', undefined);
  const unclear = vi.spyOn(Buffer, 'allocUnsafeSlow').mockImplementation((size) => Buffer.alloc(size, 0xa5));
  let restoreJitless: typeof restoreBackup;
  try {
    ({ restoreBackup: restoreJitless } = await import('../../src/backup/restore.js'));
  } finally {
    unclear.mockRestore();
    vi.unstubAllGlobals();
  }
  const target = path.join(dir(), 'old-disk.img');
  fs.writeFileSync(target, Buffer.alloc(volume.length, 0xff));
  await restoreJitless(repo, full.id, target, quiet);
  expect(fs.readFileSync(target).equals(volume)).toBe(true);
});

it('the target restored into is the file the restore created, even if its path is swapped for a symlink meanwhile', async () => {
  const repo = await BackupRepository.openOrCreate(path.join(dir(), 'repo'));
  const { volume, full } = await randomFull(repo);
  const target = path.join(dir(), 'out.img');
  const moved = path.join(dir(), 'out-moved.img');
  const victim = path.join(dir(), 'someone-elses.img');
  fs.writeFileSync(victim, Buffer.alloc(volume.length, 0x11));
  // Right after the restore creates its target, the path is swapped for a symlink to another file.
  const open = fs.promises.open;
  const spy = vi.spyOn(fs.promises, 'open').mockImplementation(async (file, flags, mode) => {
    const handle = await open(file, flags, mode);
    if (file === target && typeof flags === 'number' && (flags & fs.constants.O_CREAT) !== 0) {
      fs.renameSync(target, moved);
      fs.symlinkSync(victim, target);
    }
    return handle;
  });
  try {
    await restoreBackup(repo, full.id, target, quiet);
  } finally {
    spy.mockRestore();
  }
  expect(fs.readFileSync(victim).equals(Buffer.alloc(volume.length, 0x11))).toBe(true);
  expect(fs.readFileSync(moved).equals(volume)).toBe(true);
});
