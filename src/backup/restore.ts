/**
 * Restore: puts the volume a backup's chain (the full backup, then each incremental in order) describes onto
 * a target, at the last backup's capacity. The chain is first laid into one map of the volume
 * (chain-map.ts), so each byte is written once, in volume order, from the latest backup that stored it. On
 * an existing target, ranges no backup stored are written with zeros, so the result is the snapshot whatever
 * was there. Every chunk's hash is checked before any of its bytes are written.
 *
 * Chunks are read ahead of the writes (O_DIRECT into aligned buffers, hashed in place on the hash threads)
 * and several writes run at once (O_DIRECT where aligned): a restore's pace is the slower of the
 * repository's reads and the target's writes, not their sum plus the hashing.
 */
import type { Extent } from '../client/index.js';
import { openTarget } from './block-target.js';
import { layChain, type Placed } from './chain-map.js';
import { driverStateAround } from './driver-state.js';
import { allocAligned } from './direct-io.js';
import type { Progress } from './progress.js';
import { chunkBufferSize, RepositoryError, type BackupRepository, type ChunkHasher } from './repository.js';
import { HASH_THREADS, Sha256Threads } from './sha256-threads.js';
import fs from 'node:fs';
import path from 'node:path';

export interface RestoreSummary {
  backup: string;
  chain: string[];
  target: string;
  capacityBytes: number;
  bytesWritten: number;
  seconds: number;
}

/**
 * Zeros for the gaps, page-aligned so they can be written with O_DIRECT. Cleared here: without WebAssembly
 * allocAligned gives plain buffers, whose memory Node does not clear.
 */
const ZEROS = allocAligned(1 << 20, 1)[0]!.fill(0);
/** Chunks read ahead of the writes. */
const CHUNKS_AHEAD = 4;
/** Writes to the target under way at once. */
const WRITES_IN_FLIGHT = 8;
/**
 * Chunks held in memory at once (4 MiB each), read or being read: those read ahead and those the map uses
 * again further on (a shared chunk of an incremental holds blocks from all over the volume).
 */
const CHUNKS_HELD = 16;

export async function restoreBackup(
  repo: BackupRepository,
  id: string,
  targetPath: string,
  progress: Progress,
  signal?: AbortSignal,
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
  await refuseInside(repo.dir, targetPath);
  const map = layChain(chain, capacity);
  const target = await openTarget(targetPath, capacity);
  const hashes = new Sha256Threads(HASH_THREADS);
  const writes = new Writes(WRITES_IN_FLIGHT);
  let written = 0;
  try {
    const gaps = target.created ? [] : complement(map, capacity);
    progress.start(
      'restore',
      [...map, ...gaps].reduce((s, e) => s + e.length, 0),
    );
    // Ctrl-C stops before the next write; those under way finish, and the target keeps what they wrote.
    const write = (offset: number, data: Buffer, then?: () => void) => {
      if (signal?.aborted) {
        then?.();
        signal.throwIfAborted();
      }
      return writes.start(async () => {
        try {
          await target.write(offset, data);
        } finally {
          then?.();
        }
        progress.add(data.length);
        written += data.length;
      });
    };
    for (const gap of gaps)
      for (let o = gap.offset; o < gap.offset + gap.length; o += ZEROS.length)
        await write(o, ZEROS.subarray(0, Math.min(ZEROS.length, gap.offset + gap.length - o)));
    const chunks = new ChunkSupply(repo, map, chunkBufferSize(chain), (d) => hashes.hash(d));
    for (let k = 0; k < map.length; k++) {
      const p = map[k]!;
      const data = await chunks.take(k).catch((err: unknown) => {
        throw new RepositoryError(
          'damaged',
          `backup ${id} cannot be restored: ${(err as Error).message} (it is part of backup ${p.backup})`,
        );
      });
      if (p.chunkOffset + p.length > data.length) {
        chunks.done(k);
        throw new RepositoryError(
          'damaged',
          `chunk ${p.hash} has ${data.length} bytes where backup ${p.backup} stored ${p.length} from byte ${p.chunkOffset}`,
        );
      }
      await write(p.offset, data.subarray(p.chunkOffset, p.chunkOffset + p.length), () => chunks.done(k));
    }
    await writes.finish();
    await target.sync();
  } finally {
    progress.stop();
    await writes.finish().catch(() => undefined);
    await hashes.close();
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

/**
 * A target in the driver's state directory (driver-state.ts) would overwrite a volume's layers; one in the
 * repository its chunks or manifests (a chunk file is as large as a small volume), or leave an image among
 * them: both refused. Judged on the real paths, so no symlink leads around it.
 */
async function refuseInside(repoDir: string, targetPath: string): Promise<void> {
  const real = async (p: string) => fs.promises.realpath(p).catch(() => undefined);
  const driverState = await driverStateAround(targetPath);
  if (driverState)
    throw new RepositoryError(
      'usage',
      `target ${targetPath} is inside the cbt-csi driver's state directory ${driverState}: restore to a device or a file elsewhere`,
    );
  const repo = (await real(repoDir)) ?? repoDir;
  const where = await real(path.dirname(targetPath));
  if (where !== undefined && (where === repo || where.startsWith(`${repo}${path.sep}`)))
    throw new RepositoryError(
      'usage',
      `target ${targetPath} is inside the repository ${repoDir}: restore to a device or a file elsewhere`,
    );
}

/** Writes under way, at most `limit`: start() waits for a free place; the first failure is thrown by the next start() or finish(). */
class Writes {
  private readonly running = new Set<Promise<void>>();
  private failure: unknown;
  constructor(private readonly limit: number) {}
  async start(write: () => Promise<void>): Promise<void> {
    while (this.running.size >= this.limit) await Promise.race(this.running);
    if (this.failure !== undefined) throw this.failure;
    const p: Promise<void> = write()
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => this.running.delete(p));
    this.running.add(p);
  }
  async finish(): Promise<void> {
    await Promise.all(this.running);
    if (this.failure !== undefined) throw this.failure;
  }
}

/** A chunk read (or being read) into a buffer of the supply's pool. */
interface Held {
  data: Promise<Buffer>;
  buffer: Buffer;
  loaded: boolean;
  /** Writes of its bytes not yet done. */
  inUse: number;
}

/**
 * The chunks the map's ranges need, in map order: take(k) gives range k's chunk, read and checked, and reads
 * the next CHUNKS_AHEAD chunks meanwhile; done(k) says range k's write is over. A chunk stays held while
 * later ranges use it; past CHUNKS_HELD, the held chunk needed furthest on (and not in use) is let go and
 * read again when its turn comes.
 */
class ChunkSupply {
  /** Per chunk: the map ranges that use it, in order; how many have been taken; its place in `order`. */
  private readonly uses = new Map<string, { at: number[]; taken: number; first: number }>();
  /** Chunks in the order the map first needs them. */
  private readonly order: string[] = [];
  private readonly held = new Map<string, Held>();
  private readonly free: Buffer[] = [];
  /** Next entry of `order` to read ahead. */
  private ahead = 0;

  constructor(
    private readonly repo: BackupRepository,
    private readonly map: readonly Placed[],
    private readonly bufferSize: number,
    private readonly hasher: ChunkHasher,
  ) {
    for (const [k, p] of map.entries()) {
      const u = this.uses.get(p.hash);
      if (u) u.at.push(k);
      else {
        this.uses.set(p.hash, { at: [k], taken: 0, first: this.order.length });
        this.order.push(p.hash);
      }
    }
  }

  take(k: number): Promise<Buffer> {
    const hash = this.map[k]!.hash;
    const use = this.uses.get(hash)!;
    use.taken++;
    const h = this.held.get(hash) ?? this.load(hash);
    h.inUse++;
    // Read ahead: the chunks first needed next, as room allows.
    this.ahead = Math.max(this.ahead, use.first + 1);
    for (let n = 0; n < CHUNKS_AHEAD && this.ahead < this.order.length; n++) {
      if (this.held.size >= CHUNKS_HELD && !this.letGo()) break;
      const next = this.order[this.ahead++]!;
      if (!this.held.has(next)) this.load(next);
    }
    return h.data;
  }

  done(k: number): void {
    const hash = this.map[k]!.hash;
    const h = this.held.get(hash);
    if (!h) return;
    h.inUse--;
    const use = this.uses.get(hash)!;
    if (h.inUse === 0 && use.taken === use.at.length) this.release(hash, h);
  }

  private load(hash: string): Held {
    if (this.held.size >= CHUNKS_HELD) this.letGo();
    if (this.free.length === 0) this.free.push(...allocAligned(this.bufferSize, 4));
    const buffer = this.free.pop()!;
    const h: Held = { buffer, loaded: false, inUse: 0, data: this.repo.loadChunk(hash, buffer, this.hasher) };
    // A chunk read ahead that turns out damaged fails the take() that needs it, not the process.
    h.data.then(
      () => {
        h.loaded = true;
      },
      () => undefined,
    );
    this.held.set(hash, h);
    return h;
  }

  private release(hash: string, h: Held): void {
    this.held.delete(hash);
    this.free.push(h.buffer);
  }

  /** Lets go of the read chunk not in use that is needed furthest on; false if every held chunk is busy. */
  private letGo(): boolean {
    let victim: string | undefined;
    let furthest = -1;
    for (const [hash, h] of this.held) {
      if (!h.loaded || h.inUse > 0) continue;
      const use = this.uses.get(hash)!;
      const next = use.taken < use.at.length ? use.at[use.taken]! : Number.POSITIVE_INFINITY;
      if (next > furthest) {
        furthest = next;
        victim = hash;
      }
    }
    if (victim === undefined) return false;
    this.release(victim, this.held.get(victim)!);
    return true;
  }
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
