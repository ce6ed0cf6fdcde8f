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
import type { Layer } from './layer.js';
import type { CompactionReport } from './types.js';

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
}

/** Blocks copied between yields to the event loop, so writes keep flowing during a large merge. */
const COPY_CHUNK_BLOCKS = 256;

/** Merges abandoned in a row (the tree changed under them) before a pass gives up until the next schedule. */
const MAX_RETRIES = 8;

export class Compactor {
  private running: Promise<CompactionReport> | undefined;
  private again = false;
  private stopped = false;

  constructor(private readonly host: CompactionHost) {}

  /** Starts a pass in the background (errors are kept for the next explicit run to surface). */
  schedule(): void {
    if (this.stopped) return;
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
      } finally {
        this.running = undefined;
      }
      return total;
    })();
    return this.running;
  }

  /** Stops after the merge in progress; no further passes start. */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.running?.catch(() => undefined);
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
    for (const layer of layers.values()) {
      if (referenced.has(layer.id) || !layer.frozen) continue;
      const above = children.get(layer.id) ?? [];
      if (above.length === 0) {
        this.drop(layer);
        return { merged: 0, dropped: 1, blocksCopied: 0 };
      }
      if (above.length === 1) {
        const copied = await this.merge(layer, above[0]!);
        return copied === undefined ? 'retry' : { merged: 1, dropped: 0, blocksCopied: copied };
      }
    }
    return undefined;
  }

  private drop(layer: Layer): void {
    const applied = this.host.catalog.transaction(() => {
      this.host.catalog.deleteLayer(layer.id);
      return this.host.layerLeaving(layer, undefined);
    });
    applied();
    this.host.forgetLayer(layer);
  }

  /** Merges hidden layer `lower` into `upper`; undefined if the shape changed under it (retried next pass). */
  private async merge(lower: Layer, upper: Layer): Promise<number | undefined> {
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
          catalog.freezeLayer(upper.id, Bitmap.or(upper.written, mergedWritten), Bitmap.or(upper.trimmed, mergedTrimmed));
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
