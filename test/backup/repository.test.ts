/**
 * The repository's own rules, without a driver: identical chunks stored once; verify reports a damaged or
 * missing chunk with every backup it breaks; restore refuses a damaged chunk; a volume that grew between
 * backups restores at its new size; files 0600 and directories 0700 whatever the umask.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BackupRepository, RepositoryError } from '../../src/backup/repository.js';
import { createProgress } from '../../src/backup/progress.js';
import { restoreBackup } from '../../src/backup/restore.js';
import type { Manifest } from '../../src/backup/manifest.js';
import { looserThanPrivate } from './support/volumes.js';

const MiB = 2 ** 20;
let dir: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-repo-'));
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Commits a backup of `writes` (offset → bytes) on `base`. */
async function backup(
  repo: BackupRepository,
  capacityBytes: number,
  writes: [number, Buffer][],
  base: Manifest | null,
): Promise<Manifest> {
  const lock = await repo.lock();
  try {
    const w = await repo.begin(
      {
        snapshot: `snap-${randomBytes(4).toString('hex')}`,
        sourceVolume: 'vol-1',
        base: base?.id ?? null,
        capacityBytes,
        blockSize: MiB,
        toolVersion: 'test',
      },
      lock,
    );
    for (const [offset, data] of writes) await w.put(offset, data);
    const m = await w.commit();
    // IDs carry the millisecond they were made: keep them apart so they sort in order.
    await new Promise((r) => setTimeout(r, 2));
    return m;
  } finally {
    await lock.release();
  }
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
});
