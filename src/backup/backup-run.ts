/**
 * One backup: list what the snapshot holds (full) or what changed since the base backup's snapshot
 * (incremental), read only those bytes from a copy of the snapshot, store them as chunks, commit the
 * manifest. The listing is taken before anything is written, so its total drives the progress bar and
 * bad input (a source too small) is refused before the repository is touched.
 */
import type { Extent, SnapshotMetadataClient } from '../client/index.js';
import { packageVersion } from '../config.js';
import type { BlockSource } from './block-target.js';
import { allocAligned } from './direct-io.js';
import type { Manifest } from './manifest.js';
import type { Progress } from './progress.js';
import type { BackupRepository } from './repository.js';
import { HASH_THREADS, Sha256Threads } from './sha256-threads.js';

/**
 * Largest chunk: no stored extent crosses a multiple of it. 4 MiB (as Proxmox Backup Server uses for block
 * devices): a chunk file costs five file operations and a buffer round trip whatever its size; at 1 MiB a
 * full backup of a file took ~1.7× the client CPU (system time doubled; 7 rounds of 256 MiB each way).
 * Deduplication works on whole aligned chunks, so it is coarser: a 4 MiB range must recur as a whole.
 */
export const CHUNK_SIZE = 4 << 20;
/** Largest read of the source: reads never cross a multiple of it. */
export const READ_SIZE = 1 << 20;
/** Reads of the source in flight at once. */
export const READS_IN_FLIGHT = 8;

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
  /** Stored extents: the listed ranges, merged and cut at multiples of the chunk size. */
  extents: number;
  bytesRead: number;
  /** Chunks the extents went into (several small extents share one), stored or already there. */
  chunks: number;
  newChunks: number;
  newBytes: number;
  seconds: number;
  /** Of `seconds`: making the chunks durable (what the background flushes left) and writing the manifest. */
  commitSeconds: number;
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
  let last: Extent | undefined;
  for await (const batch of listing.batches()) {
    for (const e of batch) {
      if (last && last.offset + last.length === e.offset) last.length += e.length;
      else {
        last = { offset: e.offset, length: e.length };
        runs.push(last);
      }
      bytes += e.length;
    }
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

/**
 * The chunks of a backup, in volume order, each as the extents it holds: a whole aligned CHUNK_SIZE piece is
 * a chunk of its own (so equal data deduplicates across backups); smaller pieces are packed, in order, into
 * shared chunks of up to CHUNK_SIZE bytes (so scattered changed blocks make a file per chunk size, not per
 * block).
 */
export function* chunksOf(runs: readonly Extent[], size = CHUNK_SIZE): Generator<Extent[]> {
  let packed: Extent[] = [];
  let packedBytes = 0;
  for (const p of pieces(runs, size)) {
    if (p.length === size) {
      yield [p];
      continue;
    }
    if (packedBytes + p.length > size) {
      yield packed;
      packed = [];
      packedBytes = 0;
    }
    packed.push(p);
    packedBytes += p.length;
  }
  if (packed.length > 0) yield packed;
}

/** A chunk being filled: its extents, its buffer, and how many of its reads are still to land. */
interface FillingChunk {
  pieces: Extent[];
  data: Buffer;
  unread: number;
}

/**
 * Chunk buffers, page-aligned (so chunk files can be written with O_DIRECT, direct-io.ts), in shared memory
 * (so hash threads read them in place, sha256-threads.ts), and reused once
 * stored: a fresh buffer per chunk costs page faults on first touch and, every few dozen MiB, a V8 garbage
 * collection to release the old ones (a quarter of a full backup's CPU before the pool). At most one buffer
 * per reader is in use, so the pool holds READS_IN_FLIGHT × CHUNK_SIZE (32 MiB), twice that at worst.
 */
class BufferPool {
  private readonly free: Buffer[] = [];
  constructor(private readonly size: number) {}
  take(bytes: number): Buffer {
    if (this.free.length === 0) this.free.push(...allocAligned(this.size, READS_IN_FLIGHT));
    return this.free.pop()!.subarray(0, bytes);
  }
  give(buffer: Buffer): void {
    this.free.push(Buffer.from(buffer.buffer, buffer.byteOffset, this.size));
  }
}

/** Each read to make (at most READ_SIZE, never across a multiple of it), with where its bytes go. */
function* readsOf(
  chunks: Iterable<Extent[]>,
  pool: BufferPool,
): Generator<{ piece: Extent; into: Buffer; chunk: FillingChunk }> {
  for (const extents of chunks) {
    const reads = [...pieces(extents, READ_SIZE)];
    const chunk: FillingChunk = {
      pieces: extents,
      data: pool.take(extents.reduce((s, e) => s + e.length, 0)),
      unread: reads.length,
    };
    let at = 0;
    for (const piece of reads) {
      yield { piece, into: chunk.data.subarray(at, at + piece.length), chunk };
      at += piece.length;
    }
  }
}

/**
 * Reads the plan's bytes from `source` into a new backup and commits it. The caller holds the lock.
 * READS_IN_FLIGHT reads run at once, in volume order, each straight into its place in its chunk's buffer;
 * a chunk is hashed (on a hash thread, in place) and stored as soon as its last read lands, while the other
 * reads are under way.
 */
export async function writeBackup(
  repo: BackupRepository,
  lock: Parameters<BackupRepository['begin']>[1],
  plan: BackupPlan,
  source: BlockSource,
  progress: Progress,
  signal?: AbortSignal,
): Promise<BackupSummary> {
  const started = Date.now();
  const hashes = new Sha256Threads(HASH_THREADS);
  try {
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
      (data) => hashes.hash(data),
    );
    progress.start(plan.base ? 'incremental backup' : 'full backup', plan.bytes);
    let extents = 0;
    let failure: unknown;
    const pool = new BufferPool(CHUNK_SIZE);
    const work = readsOf(chunksOf(plan.runs), pool);
    // As many readers as reads in flight, each taking the next read in volume order: a read lands in its
    // chunk's buffer, and the reader that lands a chunk's last read stores the chunk.
    const reader = async (): Promise<void> => {
      for (;;) {
        if (failure !== undefined) return;
        const next = work.next();
        if (next.done) return;
        const { piece, into, chunk } = next.value;
        try {
          signal?.throwIfAborted();
          await source.readInto(into, piece.offset);
          progress.add(piece.length);
          if (--chunk.unread === 0) {
            extents += chunk.pieces.length;
            await writer.putChunk(chunk.pieces, chunk.data);
            pool.give(chunk.data);
          }
        } catch (err) {
          failure ??= err;
        }
      }
    };
    let committing: number;
    let manifest: Manifest;
    try {
      try {
        await Promise.all(Array.from({ length: READS_IN_FLIGHT }, reader));
        if (failure !== undefined) throw failure;
        signal?.throwIfAborted();
      } finally {
        progress.stop();
      }
      committing = Date.now();
      manifest = await writer.commit();
    } catch (err) {
      // Failed, interrupted or not committed: what it stored goes, so only committed backups' chunks stay.
      await writer.abandon().catch(() => undefined);
      throw err;
    }
    const done = Date.now();
    return {
      id: manifest.id,
      kind: plan.base ? 'incremental' : 'full',
      snapshot: plan.snapshot,
      base: manifest.base,
      capacityBytes: plan.capacityBytes,
      extents,
      bytesRead: plan.bytes,
      chunks: writer.chunks,
      newChunks: writer.newChunks,
      newBytes: writer.newBytes,
      seconds: (done - started) / 1000,
      commitSeconds: (done - committing) / 1000,
      metadataResumes: plan.resumes,
    };
  } finally {
    await hashes.close();
  }
}
