/** Backups committed straight through the repository's writer, for tests of the repository and of restore. */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach } from 'vitest';
import type { Manifest } from '../../../src/backup/manifest.js';
import type { BackupRepository } from '../../../src/backup/repository.js';

/** A fresh temp directory for each test of the calling file, removed after it; call the result for its path. */
export function tempDirPerTest(prefix: string): () => string {
  let dir = '';
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return () => dir;
}

/**
 * Commits a backup on `base` whose chunks are `chunks`, each a list of (offset, bytes) stored back to back
 * in one chunk.
 */
export async function commitBackup(
  repo: BackupRepository,
  capacityBytes: number,
  chunks: [number, Buffer][][],
  base: Manifest | null,
  blockSize: number,
): Promise<Manifest> {
  const lock = await repo.lock();
  try {
    const w = await repo.begin(
      {
        snapshot: `snap-${randomBytes(4).toString('hex')}`,
        sourceVolume: 'vol-1',
        base: base?.id ?? null,
        capacityBytes,
        blockSize,
        toolVersion: 'test',
      },
      lock,
    );
    for (const pieces of chunks)
      await w.putChunk(
        pieces.map(([offset, data]) => ({ offset, length: data.length })),
        Buffer.concat(pieces.map(([, data]) => data)),
      );
    const m = await w.commit();
    // IDs carry the millisecond they were made: keep them apart so they sort in order.
    await new Promise((r) => setTimeout(r, 2));
    return m;
  } finally {
    await lock.release();
  }
}
