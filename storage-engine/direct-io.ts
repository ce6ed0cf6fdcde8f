/**
 * Direct I/O sessions: a host outside the engine's thread (the node data plane's I/O threads) reads a volume
 * through a copy of its chain's location index and writes whole blocks straight into the head's file, without
 * an engine call per request. The engine keeps its rules by calling the host back, synchronously:
 *
 * - `drain()` before anything reads or changes the volume's blocks (engine reads, writes, trims, a flush):
 *   the host records every direct write that has completed, so bits and index include it. A completed direct
 *   write is therefore in the bitmap before any FSYNC that follows it returns (invariant 3).
 * - `revoke()` before the head or the chain changes shape (snapshot, clone, merge, delete, close): the host
 *   stops writing, waits for writes in flight and records them. Nothing is ever written into a frozen layer.
 * - `exclusive()` around a change the engine makes itself (a write or trim through its API): the host stops
 *   direct writes and drains them, the engine changes the blocks, and the host learns which, so its copy of
 *   the index stays exact and orders that change where the engine applied it, among the direct writes.
 *
 * The host only ever writes whole blocks into the head and records them after the write returned, so a bit
 * is never set for bytes that are not in the file; until it is recorded, the host's own log of completed
 * writes is what makes its reads of those blocks correct, and nothing else reads them (invariant 4).
 */
import { type Bitmap, runsOf } from './bitmap.js';
import type { Layer } from './layer.js';
import type { LocationIndex } from './location-index.js';

/** What the engine asks of a session's host. Every call is synchronous, on the engine's thread. */
export interface DirectIoHost {
  /** Record (through `recordWritten`) every direct write that has completed; direct writes may go on. */
  drain(): void;
  /**
   * End the session: return only once no direct write is in flight and every completed one was recorded
   * through `recordWritten`. After this the session is closed and records nothing more.
   */
  revoke(): void;
  /**
   * Runs `change` (an engine write or trim of the volume) with no direct write in flight and every completed
   * one recorded, then takes `changed` as what it did: blocks [first, end) now read from the head (`toHead`)
   * or as zeros. If `change` throws, the host ends the session (its copy of the index may be wrong) and
   * rethrows.
   */
  exclusive(change: () => void, changed: readonly ChangedBlocks[]): void;
}

/** Blocks [first, end) that an engine change left reading from the head (`toHead`) or as zeros. */
export type ChangedBlocks = readonly [first: number, end: number, toHead: boolean];

/** A copy of what a session reads from: the chain's location index and the files it names. */
export interface DirectIoView {
  readonly blockSize: number;
  /** Capacity when the view was taken; a volume only grows, so bounds checked against it stay safe. */
  readonly capacityBytes: number;
  /** The head: the layer direct writes go to (block i at byte i × blockSize). */
  readonly head: { readonly id: number; readonly path: string };
  /** Blocks [starts[i], ends[i]) read from layer owners[i]; blocks in no run read as zeros. */
  readonly starts: Float64Array;
  readonly ends: Float64Array;
  readonly owners: Int32Array;
  /** The file of every layer the runs name, and of the head. */
  readonly layerPaths: ReadonlyMap<number, string>;
  /**
   * Blocks [engineWriteStarts[i], engineWriteEnds[i]) a direct write must leave to the engine: a change record
   * excludes them, and must hear of a rewrite before the bytes land (invariant 8). The set only shrinks while
   * the session lasts (it grows by merges into the head, which end sessions).
   */
  readonly engineWriteStarts: Float64Array;
  readonly engineWriteEnds: Float64Array;
}

/** The engine's side of a volume's I/O a session works on (the volume's BlockIo, narrowed). */
export interface SessionIo {
  readonly head: Layer;
  readonly index: LocationIndex<Layer>;
  readonly blockSize: number;
}

export class DirectIoSession {
  #open = true;
  readonly headId: number;

  constructor(
    readonly volumeId: string,
    private readonly io: SessionIo,
    private readonly capacityBytes: () => number,
    /** Blocks of the head that only engine writes may change (see DirectIoView.engineWriteStarts). */
    private readonly engineOnly: () => Bitmap,
    readonly host: DirectIoHost,
    private readonly onClose: (session: DirectIoSession) => void,
  ) {
    this.headId = io.head.id;
  }

  /** Whether the session may still record writes (neither revoked nor closed). */
  get open(): boolean {
    return this.#open;
  }

  /**
   * The chain as it reads now. Take it right after draining: the view plus every direct write and `changed`
   * call after it is the volume's content.
   */
  view(): DirectIoView {
    this.checkOpen();
    const runs = [...this.io.index.runs()];
    const starts = new Float64Array(runs.length);
    const ends = new Float64Array(runs.length);
    const owners = new Int32Array(runs.length);
    const layerPaths = new Map<number, string>([[this.io.head.id, this.io.head.path]]);
    runs.forEach((run, i) => {
      starts[i] = run.start;
      ends[i] = run.end;
      owners[i] = run.owner.id;
      if (!layerPaths.has(run.owner.id)) layerPaths.set(run.owner.id, run.owner.path);
    });
    const engineRuns = [...runsOf(this.engineOnly())];
    return {
      blockSize: this.io.blockSize,
      capacityBytes: this.capacityBytes(),
      head: { id: this.io.head.id, path: this.io.head.path },
      starts,
      ends,
      owners,
      layerPaths,
      engineWriteStarts: Float64Array.from(engineRuns, (r) => r[0]),
      engineWriteEnds: Float64Array.from(engineRuns, (r) => r[1]),
    };
  }

  /**
   * Records blocks [first, end) as written into the head: the host wrote them in full into the head's file
   * and the write returned. Sets their bits and points the index at the head, as an engine write does.
   */
  recordWritten(first: number, end: number): void {
    this.checkOpen();
    const head = this.io.head;
    if (head.id !== this.headId) throw new Error(`internal: direct I/O session of layer ${this.headId} outlived it`);
    const blocks = Math.ceil(this.capacityBytes() / this.io.blockSize);
    if (!(Number.isSafeInteger(first) && Number.isSafeInteger(end) && first >= 0 && first < end && end <= blocks)) {
      throw new RangeError(`direct write of blocks [${first}, ${end}) is outside the volume's ${blocks} blocks`);
    }
    head.markWritten(first, end);
    this.io.index.assign(first, end, head);
  }

  /** The host ends the session itself (its file was closed). Idempotent. */
  close(): void {
    if (!this.#open) return;
    this.#open = false;
    this.onClose(this);
  }

  /** The engine ends the session: the host stops writing and records what it wrote, then it is closed. */
  revoke(): void {
    if (!this.#open) return;
    try {
      this.host.revoke();
    } finally {
      this.close();
    }
  }

  private checkOpen(): void {
    if (!this.#open) throw new Error(`direct I/O session on volume ${this.volumeId} is closed`);
  }
}
