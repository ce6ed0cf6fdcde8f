/**
 * Restore: replays a backup's chain (the full backup, then each incremental in order) onto a target, at
 * the last backup's capacity. Every chunk's hash is checked before its bytes are written. On an existing
 * target, ranges no backup stored are written with zeros, so the result is the snapshot whatever was there.
 */
import type { Extent } from '../client/index.js';
import { openTarget } from './block-target.js';
import type { Progress } from './progress.js';
import { RepositoryError, type BackupRepository } from './repository.js';
import fs from 'node:fs';

export interface RestoreSummary {
  backup: string;
  chain: string[];
  target: string;
  capacityBytes: number;
  bytesWritten: number;
  seconds: number;
}

const ZEROS = Buffer.alloc(1 << 20);
/** Chunks a restore holds in memory at once, at most (4 MiB each). */
const CHUNKS_KEPT = 8;

export async function restoreBackup(
  repo: BackupRepository,
  id: string,
  targetPath: string,
  progress: Progress,
): Promise<RestoreSummary> {
  const started = Date.now();
  const chain = await repo.chain(id);
  const capacity = chain.at(-1)!.capacityBytes;
  // Every chunk must be there before anything is written; hashes are checked as chunks are read.
  const missing = new Set<string>();
  const seen = new Set<string>();
  for (const m of chain)
    for (const [, , hash] of m.extents) {
      if (seen.has(hash)) continue;
      seen.add(hash);
      if (!fs.existsSync(repo.chunkPath(hash))) missing.add(hash);
    }
  if (missing.size > 0) {
    throw new RepositoryError(
      'damaged',
      `backup ${id} cannot be restored: ${missing.size} chunk(s) are missing, e.g. ${[...missing][0]} (run \`cbt-csi verify --repo ${repo.dir}\`)`,
    );
  }
  const target = await openTarget(targetPath, capacity);
  let written = 0;
  try {
    let total = 0;
    for (const m of chain)
      for (const [offset, length] of m.extents) if (offset < capacity) total += Math.min(length, capacity - offset);
    const gaps = target.created
      ? []
      : complement(
          chain.flatMap((m) => m.extents.map(([offset, length]) => ({ offset, length }))),
          capacity,
        );
    total += gaps.reduce((s, g) => s + g.length, 0);
    progress.start('restore', total);
    for (const gap of gaps) {
      for (let o = gap.offset; o < gap.offset + gap.length; o += ZEROS.length) {
        const n = Math.min(ZEROS.length, gap.offset + gap.length - o);
        await target.write(o, ZEROS.subarray(0, n));
        progress.add(n);
        written += n;
      }
    }
    // In a manifest the extents of a shared chunk need not be adjacent (whole chunks sit between them), so
    // a chunk read is kept until its manifest's last extent in it, up to CHUNKS_KEPT (a backup made by
    // this tool fills its shared chunks in volume order: one is open at a time).
    const kept = new Map<string, Buffer>();
    for (const m of chain) {
      const lastUse = new Map<string, number>();
      for (const [i, [, , hash]] of m.extents.entries()) lastUse.set(hash, i);
      kept.clear();
      for (const [i, [offset, length, hash, chunkOffset]] of m.extents.entries()) {
        if (offset >= capacity) continue;
        let data = kept.get(hash);
        if (!data) {
          data = await repo.readChunk(hash).catch((err: unknown) => {
            throw new RepositoryError(
              'damaged',
              `backup ${id} cannot be restored: ${(err as Error).message} (it is part of backup ${m.id})`,
            );
          });
          if (kept.size >= CHUNKS_KEPT) kept.delete(kept.keys().next().value!);
          kept.set(hash, data);
        }
        if (lastUse.get(hash) === i) kept.delete(hash);
        if (chunkOffset + length > data.length)
          throw new RepositoryError(
            'damaged',
            `chunk ${hash} has ${data.length} bytes where backup ${m.id} stored ${length} from byte ${chunkOffset}`,
          );
        const n = Math.min(length, capacity - offset);
        await target.write(offset, data.subarray(chunkOffset, chunkOffset + n));
        progress.add(n);
        written += n;
      }
    }
    await target.sync();
  } finally {
    progress.stop();
    await target.close();
  }
  return {
    backup: id,
    chain: chain.map((m) => m.id),
    target: targetPath,
    capacityBytes: capacity,
    bytesWritten: written,
    seconds: (Date.now() - started) / 1000,
  };
}

/** The parts of [0, capacity) that no extent covers. */
export function complement(extents: Extent[], capacity: number): Extent[] {
  const sorted = [...extents].sort((a, b) => a.offset - b.offset);
  const out: Extent[] = [];
  let at = 0;
  for (const e of sorted) {
    if (e.offset > at) out.push({ offset: at, length: Math.min(e.offset, capacity) - at });
    at = Math.max(at, e.offset + e.length);
    if (at >= capacity) break;
  }
  if (at < capacity) out.push({ offset: at, length: capacity - at });
  return out.filter((g) => g.length > 0);
}
