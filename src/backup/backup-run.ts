/**
 * One backup: list what the snapshot holds (full) or what changed since the base backup's snapshot
 * (incremental), read only those bytes from a copy of the snapshot, store them as chunks, commit the
 * manifest. The listing is taken before anything is written, so its total drives the progress bar and
 * bad input (a source too small) is refused before the repository is touched.
 */
import type { Extent, SnapshotMetadataClient } from '../client/index.js';
import { packageVersion } from '../config.js';
import type { BlockSource } from './block-target.js';
import type { Manifest } from './manifest.js';
import type { Progress } from './progress.js';
import type { BackupRepository } from './repository.js';

/** Largest chunk: chunks never cross a multiple of it. */
export const CHUNK_SIZE = 1 << 20;
/** Reads and chunk writes in flight at once. */
const IN_FLIGHT = 8;

export interface BackupPlan {
  snapshot: string;
  sourceVolume: string | null;
  base: Manifest | null;
  capacityBytes: number;
  /** Merged byte ranges to read, in order. */
  runs: Extent[];
  bytes: number;
  /** Times the metadata stream was resumed. */
  resumes: number;
}

export interface BackupSummary {
  id: string;
  kind: 'full' | 'incremental';
  snapshot: string;
  base: string | null;
  capacityBytes: number;
  extents: number;
  bytesRead: number;
  newChunks: number;
  newBytes: number;
  seconds: number;
  metadataResumes: number;
}

/**
 * What planBackup asks: the snapshot's allocated extents, or those changed since a base snapshot, both
 * by CSI snapshot ID. A SnapshotMetadataClient in CSI-direct mode is one as it is; in Kubernetes mode the
 * caller maps the IDs to the VolumeSnapshot it backs up.
 */
export type SnapshotLister = Pick<SnapshotMetadataClient, 'allocated' | 'delta'>;

/** Lists the extents to read, merged into runs. */
export async function planBackup(
  client: SnapshotLister,
  snapshot: string,
  sourceVolume: string | null,
  base: Manifest | null,
  signal?: AbortSignal,
): Promise<BackupPlan> {
  const listing = base
    ? await client.delta(base.snapshot, snapshot, { signal })
    : await client.allocated(snapshot, { signal });
  const runs: Extent[] = [];
  let bytes = 0;
  for await (const e of listing) {
    const last = runs.at(-1);
    if (last && last.offset + last.length === e.offset) last.length += e.length;
    else runs.push({ offset: e.offset, length: e.length });
    bytes += e.length;
  }
  return { snapshot, sourceVolume, base, capacityBytes: listing.capacityBytes, runs, bytes, resumes: listing.resumes };
}

/** Runs cut at multiples of `size`: the chunks of a backup. */
export function* pieces(runs: readonly Extent[], size = CHUNK_SIZE): Generator<Extent> {
  for (const r of runs) {
    let offset = r.offset;
    const end = r.offset + r.length;
    while (offset < end) {
      const next = Math.min(end, (Math.floor(offset / size) + 1) * size);
      yield { offset, length: next - offset };
      offset = next;
    }
  }
}

/** Reads the plan's bytes from `source` into a new backup and commits it. The caller holds the lock. */
export async function writeBackup(
  repo: BackupRepository,
  lock: Parameters<BackupRepository['begin']>[1],
  plan: BackupPlan,
  source: BlockSource,
  progress: Progress,
  signal?: AbortSignal,
): Promise<BackupSummary> {
  const started = Date.now();
  const writer = await repo.begin(
    {
      snapshot: plan.snapshot,
      sourceVolume: plan.sourceVolume,
      base: plan.base?.id ?? null,
      capacityBytes: plan.capacityBytes,
      blockSize: CHUNK_SIZE,
      toolVersion: packageVersion(),
    },
    lock,
  );
  progress.start(plan.base ? 'incremental backup' : 'full backup', plan.bytes);
  let extents = 0;
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  try {
    for (const p of pieces(plan.runs)) {
      signal?.throwIfAborted();
      if (failure) throw failure;
      const job = source
        .read(p.offset, p.length)
        .then((data) => writer.put(p.offset, data))
        .then(() => progress.add(p.length))
        .catch((err: unknown) => {
          failure ??= err;
        });
      const tracked = job.finally(() => inFlight.delete(tracked));
      inFlight.add(tracked);
      extents++;
      if (inFlight.size >= IN_FLIGHT) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    if (failure) throw failure;
    signal?.throwIfAborted();
  } finally {
    await Promise.all(inFlight);
    progress.stop();
  }
  const manifest = await writer.commit();
  return {
    id: manifest.id,
    kind: plan.base ? 'incremental' : 'full',
    snapshot: plan.snapshot,
    base: manifest.base,
    capacityBytes: plan.capacityBytes,
    extents,
    bytesRead: plan.bytes,
    newChunks: writer.newChunks,
    newBytes: writer.newBytes,
    seconds: (Date.now() - started) / 1000,
    metadataResumes: plan.resumes,
  };
}
