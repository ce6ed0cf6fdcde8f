/**
 * Compaction: a layer that no volume or snapshot references any more ("hidden") is merged into the one
 * layer above it, copying only the blocks that layer does not override, or dropped if nothing is
 * above it. Both keep every remaining chain reading exactly as before (invariant 2): the merged layer
 * answers for a block exactly where the pair answered before.
 *
 * Crash safety: copied bytes land at positions the target has no bit for, so they are invisible
 * (invariant 4) until one transaction adds the bits, re-parents the target and drops the hidden layer;
 * the hidden layer's file is unlinked only after that commit (a crash in between leaves an orphan that
 * start-up removes).
 */
import { Bitmap } from './bitmap.js';
import type { Catalog } from './catalog.js';
import { isNoSpace } from './errors.js';
import { eventSink, type EmitEvent } from './events.js';
import type { Layer } from './layer.js';
import type { SpaceReserve } from './space-reserve.js';
import type { CompactionReport, StoreOptions } from './types.js';

/** What compaction needs of the store. */
export interface CompactionHost {
  readonly catalog: Catalog;
  readonly layers: Map<number, Layer>;
  /** Volume heads and snapshot layers. */
  referencedLayers(): Set<number>;
  /** Drops a layer the catalog no longer names from memory and disk. */
  forgetLayer(layer: Layer): void;
  /** A merge committed: whatever read `lower`'s blocks now reads them from `upper`. */
  merged(lower: Layer, upper: Layer): void;
  /**
   * Inside a merge's or a drop's transaction, before any bits change: records what must move with the layer
   * (change records anchored at it). Returns what to apply in memory once the transaction committed.
   */
  layerLeaving(leaving: Layer, into: Layer | undefined): () => void;
  /** A merge into live head `head` starts: direct I/O on its volume ends until the returned call. */
  holdDirectIoOff(head: Layer): () => void;
}

/** Blocks copied between yields to the event loop, so writes keep flowing during a large merge. */
const COPY_CHUNK_BLOCKS = 256;

/** Merges abandoned in a row (the tree changed under them) before a pass gives up until the next schedule. */
const MAX_RETRIES = 8;

/** Default delays between retries of a failed background pass: doubling from 1 s up to 5 min. */
const DEFAULT_RETRY = { firstMs: 1000, maxMs: 5 * 60_000 };

/** How compaction reports failures and makes room; all optional. */
export interface CompactorOptions {
  /** Retry failed passes in the background with these delays; undefined: only explicit runs (tests). */
  retry?: StoreOptions['compactionRetry'];
  onEvent?: StoreOptions['onEvent'];
  /** Protects the store's space reserve from merge copies and lets drops use it. */
  space?: SpaceReserve;
}

export class Compactor {
  private running: Promise<CompactionReport> | undefined;
  private again = false;
  private stopped = false;
  /** Failed passes in a row; a pass that completes resets it. */
  private failures = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly emit: EmitEvent;
  private readonly retry: { firstMs: number; maxMs: number } | undefined;

  constructor(
    private readonly host: CompactionHost,
    private readonly options: CompactorOptions = {},
  ) {
    this.emit = eventSink(options.onEvent);
    this.retry = options.retry && { ...DEFAULT_RETRY, ...options.retry };
  }

  /** Starts a pass in the background now (replacing a pending retry); a failure is reported and retried. */
  schedule(): void {
    if (this.stopped) return;
    this.cancelRetry();
    void this.run().catch(() => undefined);
  }

  /** Runs passes until no hidden layer is left to merge or drop; concurrent callers share the work. */
  run(): Promise<CompactionReport> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    this.running = (async () => {
      const total: CompactionReport = { merged: 0, dropped: 0, blocksCopied: 0 };
      try {
        this.options.space?.restore();
        do {
          this.again = false;
          await new Promise<void>((resolve) => setImmediate(resolve));
          let retries = 0;
          while (!this.stopped) {
            const step = await this.step();
            if (!step) break;
            if (step === 'retry') {
              // The tree changed under a merge; each change is progress elsewhere, but do not spin on it.
              if (++retries > MAX_RETRIES) break;
              continue;
            }
            retries = 0;
            total.merged += step.merged;
            total.dropped += step.dropped;
            total.blocksCopied += step.blocksCopied;
          }
        } while (this.again && !this.stopped);
      } catch (err) {
        this.failed(err);
        throw err;
      } finally {
        this.running = undefined;
      }
      if (this.failures > 0 && !this.stopped) {
        this.emit({ type: 'compaction-recovered', failures: this.failures });
        this.failures = 0;
      }
      return total;
    })();
    return this.running;
  }

  /** Stops after the merge in progress; no further passes start. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.cancelRetry();
    await this.running?.catch(() => undefined);
  }

  /**
   * A failed pass is never forgotten: the layers it left are still hidden and still take space. It is
   * reported and, in the background, tried again after a delay that doubles with each failure in a row.
   */
  private failed(err: unknown): void {
    this.failures++;
    const retryInMs =
      this.retry && !this.stopped
        ? Math.min(this.retry.maxMs, this.retry.firstMs * 2 ** Math.min(this.failures - 1, 30))
        : undefined;
    const error = err instanceof Error ? err : new Error(String(err));
    this.emit({ type: 'compaction-failed', error, noSpace: isNoSpace(err), failures: this.failures, retryInMs });
    if (retryInMs === undefined) return;
    this.cancelRetry();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.schedule();
    }, retryInMs);
    // A pending retry must not keep a finished process alive.
    this.retryTimer.unref();
  }

  private cancelRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
  }

  /**
   * One merge or drop, decided on a fresh view of the layer tree; undefined when there is nothing to do.
   * After any await the view is stale (snapshots may have frozen new layers meanwhile), so a step never
   * goes on to a second candidate: the caller asks again.
   */
  private async step(): Promise<CompactionReport | 'retry' | undefined> {
    const { layers } = this.host;
    const referenced = this.host.referencedLayers();
    const children = new Map<number, Layer[]>();
    for (const layer of layers.values()) {
      if (layer.parentId === null) continue;
      const list = children.get(layer.parentId);
      if (list) list.push(layer);
      else children.set(layer.parentId, [layer]);
    }
    const hidden = [...layers.values()].filter((layer) => !referenced.has(layer.id) && layer.frozen);
    // Drops first: they need no space and give back a whole file, which a merge may then need.
    for (const layer of hidden) {
      if (!children.has(layer.id)) {
        this.drop(layer);
        return { merged: 0, dropped: 1, blocksCopied: 0 };
      }
    }
    for (const layer of hidden) {
      const above = children.get(layer.id)!;
      if (above.length === 1) {
        const upper = above[0]!;
        // A copy the disk cannot hold fails before it starts, and never eats the space reserve.
        const toCopy = Bitmap.andNot(layer.written, Bitmap.or(upper.written, upper.trimmed)).size * layer.blockSize;
        this.options.space?.checkRoomToCopy(toCopy, `merging layer ${layer.id} into layer ${upper.id}`);
        const copied = await this.merge(layer, upper);
        return copied === undefined ? 'retry' : { merged: 1, dropped: 0, blocksCopied: copied };
      }
    }
    return undefined;
  }

  private drop(layer: Layer): void {
    const { catalog } = this.host;
    const space = this.options.space;
    // One transaction drops the layer and what was anchored at it (change records of deleted snapshots).
    const commit = () =>
      catalog.transaction(() => {
        catalog.deleteLayer(layer.id);
        return this.host.layerLeaving(layer, undefined);
      });
    // A drop frees space, so it may spend the reserve to commit on a full disk.
    const applied = space ? space.freeing(`dropping layer ${layer.id}`, commit) : commit();
    applied();
    this.host.forgetLayer(layer);
  }

  /** Merges hidden layer `lower` into `upper`; undefined if the shape changed under it (retried next pass). */
  private async merge(lower: Layer, upper: Layer): Promise<number | undefined> {
    const resumeDirectIo = upper.frozen ? () => undefined : this.host.holdDirectIoOff(upper);
    try {
      return await this.copyAndCommit(lower, upper);
    } finally {
      resumeDirectIo();
    }
  }

  private async copyAndCommit(lower: Layer, upper: Layer): Promise<number | undefined> {
    const toCopy = Bitmap.andNot(lower.written, Bitmap.or(upper.written, upper.trimmed));
    const B = lower.blockSize;
    const buffer = Buffer.allocUnsafe(COPY_CHUNK_BLOCKS * B);
    let copied = 0;
    const values = new Uint32Array(COPY_CHUNK_BLOCKS);
    for (let index = 0; index < toCopy.size; ) {
      // The upper layer may have been deleted with its volume meanwhile: nothing to merge into any more.
      if (this.stopped || this.host.layers.get(upper.id) !== upper) return undefined;
      const chunk = toCopy.rangeUint32Array(values, index, COPY_CHUNK_BLOCKS);
      index += chunk.length;
      // Runs of consecutive blocks the upper layer still does not hold are copied with one read and one write.
      let i = 0;
      while (i < chunk.length) {
        const first = chunk[i]!;
        if (upper.holds(first)) {
          i++;
          continue;
        }
        let n = 1;
        while (i + n < chunk.length && chunk[i + n] === first + n && !upper.holds(first + n)) n++;
        const bytes = n * B;
        lower.readInto(buffer, 0, bytes, first * B);
        upper.writeAt(buffer.subarray(0, bytes), first * B);
        copied += n;
        i += n;
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    return upper.exclusive(() => this.commitMerge(lower, upper, copied));
  }

  /** The single synchronous commit of a merge, after re-checking that the shape is still the one merged. */
  private commitMerge(lower: Layer, upper: Layer, copied: number): number | undefined {
    const { layers, catalog } = this.host;
    if (this.stopped || layers.get(lower.id) !== lower || layers.get(upper.id) !== upper) return undefined;
    if (upper.parentId !== lower.id || this.host.referencedLayers().has(lower.id)) return undefined;
    for (const layer of layers.values()) if (layer !== upper && layer.parentId === lower.id) return undefined;

    // Copied data and any user writes to a live upper layer become durable before any bit names them.
    const user = upper.frozen ? undefined : upper.takeDirtyDurable();
    if (upper.frozen) upper.syncDataNow();
    const held = Bitmap.or(upper.written, upper.trimmed);
    const mergedWritten = Bitmap.andNot(lower.written, held);
    const mergedTrimmed = Bitmap.andNot(lower.trimmed, held);
    let moved: () => void = () => undefined;
    try {
      catalog.transaction(() => {
        moved = this.host.layerLeaving(lower, upper);
        if (user) {
          catalog.appendJournal(upper.id, user.setWritten, user.setTrimmed);
          catalog.appendJournal(upper.id, mergedWritten, mergedTrimmed);
        } else {
          catalog.freezeLayer(
            upper.id,
            Bitmap.or(upper.written, mergedWritten),
            Bitmap.or(upper.trimmed, mergedTrimmed),
          );
        }
        catalog.setLayerParent(upper.id, lower.parentId);
        catalog.deleteLayer(lower.id);
      });
    } catch (err) {
      user?.restore();
      throw err;
    }
    moved();
    upper.absorb(mergedWritten, mergedTrimmed, lower.parentId);
    this.host.merged(lower, upper);
    this.host.forgetLayer(lower);
    return copied;
  }
}
