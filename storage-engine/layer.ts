/**
 * A layer: one sparse data file (block i at byte i × blockSize, so no mapping table) and two disjoint
 * roaring bitmaps saying which blocks it holds as data (`written`) or as zeros (`trimmed`).
 * The bitmaps are the truth (invariant 4): bytes in the file at a position with no bit are never read.
 *
 * The layer is the single home of invariant 3 (data durable before the bits naming it): blocks changed
 * since the last catalog commit are tracked privately, and every way of committing them — `commit` for a
 * flush, `prepareFreeze` + `freeze` for a snapshot or clone, `takeDirtyDurable` for a merge — syncs the
 * file first.
 */
import fs from 'node:fs';
import { Bitmap } from './bitmap.js';
import { translateIoError } from './errors.js';
import { readLayerBytes } from './layer-bytes.js';

/** Where a layer's bits are committed (the catalog). */
export interface BitsJournal {
  /** Records blocks newly set to written / trimmed in a live layer. */
  appendJournal(layerId: number, setWritten: Bitmap, setTrimmed: Bitmap): void;
}

/** Bits taken for a commit made by the caller, with the way back if that commit fails. */
export interface TakenBits {
  readonly setWritten: Bitmap;
  readonly setTrimmed: Bitmap;
  /** Puts the taken blocks back as uncommitted (the caller's transaction failed). */
  restore(): void;
}

export class Layer {
  /** Blocks whose bits changed since the last commit to the catalog. */
  #dirty = new Bitmap();
  /** Counts writes and trims, so a freeze can tell whether any landed after its asynchronous sync. */
  #writeSeq = 0;
  #parentId: number | null;
  #frozen: boolean;
  /** Tail of this layer's commit queue (see `exclusive`). */
  #commitTail: Promise<unknown> = Promise.resolve();
  #fd: number | undefined;
  /** Told of every write and trim (the store watches live heads that anchor change records). */
  onTouched: ((first: number, end: number) => void) | undefined;

  constructor(
    readonly id: number,
    parentId: number | null,
    readonly blockSize: number,
    readonly path: string,
    /** Blocks this layer holds as data. Change them only through this class. */
    readonly written: Bitmap,
    /** Blocks this layer holds as zeros (trimmed), disjoint from written. */
    readonly trimmed: Bitmap,
    frozen: boolean,
  ) {
    this.#parentId = parentId;
    this.#frozen = frozen;
  }

  /** The layer below, or null for a chain's root. Changes only when compaction merges the parent away. */
  get parentId(): number | null {
    return this.#parentId;
  }

  /** Frozen layers belong to snapshots (or hidden history) and take no more writes, only merges. */
  get frozen(): boolean {
    return this.#frozen;
  }

  /** Whether blocks changed since the last commit. */
  get hasUncommitted(): boolean {
    return !this.#dirty.isEmpty;
  }

  /**
   * Runs `fn` after every earlier commit task of this layer. Every change to the layer's persisted bits
   * (flush, freeze, merge) goes through here, so an older captured change can never land after a newer one.
   */
  exclusive<T>(fn: () => Promise<T> | T): Promise<T> {
    const run = this.#commitTail.then(fn, fn);
    this.#commitTail = run.catch(() => undefined);
    return run;
  }

  /** Whether the layer answers for block i (with data or with zeros). */
  holds(block: number): boolean {
    return this.written.has(block) || this.trimmed.has(block);
  }

  // ---------------------------------------------------------------- data

  /** Reads `length` bytes at byte `position` of the file into `target` at `targetOffset`. */
  readInto(target: Uint8Array, targetOffset: number, length: number, position: number): void {
    readLayerBytes(this.handle(), target, targetOffset, length, position);
  }

  /** Writes `data` at byte `position` of the file (bits are set separately, by `markWritten` or a merge). */
  writeAt(data: Uint8Array, position: number): void {
    const fd = this.handle();
    let done = 0;
    try {
      while (done < data.length) {
        done += fs.writeSync(fd, data, done, data.length - done, position + done);
      }
    } catch (err) {
      translateIoError(err, `writing layer ${this.id}`);
    }
  }

  /** Marks blocks [first, end) as written here (a live layer only). */
  markWritten(first: number, end: number): void {
    this.checkLive();
    this.written.addRange(first, end);
    this.trimmed.removeRange(first, end);
    this.#dirty.addRange(first, end);
    this.#writeSeq++;
    this.onTouched?.(first, end);
  }

  /** Marks blocks [first, end) as trimmed (zeros) here (a live layer only). */
  markTrimmed(first: number, end: number): void {
    this.checkLive();
    this.trimmed.addRange(first, end);
    this.written.removeRange(first, end);
    this.#dirty.addRange(first, end);
    this.#writeSeq++;
    this.onTouched?.(first, end);
  }

  // ---------------------------------------------------------------- the durability protocol (invariant 3)

  /**
   * Flush: makes the file's data durable, then records the blocks changed since the last commit. Run it
   * inside `exclusive`. A failure leaves those blocks uncommitted, to be committed by the next try.
   */
  async commit(journal: BitsJournal, stillWanted: () => boolean = () => true): Promise<void> {
    if (this.#dirty.isEmpty) return;
    const dirty = this.#dirty;
    this.#dirty = new Bitmap();
    try {
      await this.syncData();
      // Frozen meanwhile: the freeze stored the complete bitmaps, so there is nothing left to record.
      if (this.#frozen || !stillWanted()) return;
      journal.appendJournal(this.id, Bitmap.and(dirty, this.written), Bitmap.and(dirty, this.trimmed));
    } catch (err) {
      this.#dirty.orInPlace(dirty);
      translateIoError(err, `flushing layer ${this.id}`);
    }
  }

  /**
   * First half of a freeze: makes the data durable without blocking the event loop for the bulk of it.
   * Returns a check to call after the caller's last await: it syncs again, synchronously, only if writes
   * landed meanwhile. The freeze transaction then stores the complete bitmaps.
   */
  async prepareFreeze(): Promise<() => void> {
    const seq = this.#writeSeq;
    try {
      if (!this.#dirty.isEmpty) await this.syncData();
    } catch (err) {
      translateIoError(err, `flushing layer ${this.id}`);
    }
    return () => {
      if (this.#writeSeq === seq) return;
      try {
        this.syncDataNow();
      } catch (err) {
        translateIoError(err, `flushing layer ${this.id}`);
      }
    };
  }

  /** Second half of a freeze, after the transaction storing the complete bitmaps committed. */
  freeze(): void {
    this.#frozen = true;
    this.#dirty = new Bitmap();
    // Let go of the writer's descriptor: ext4 keeps an inode's block preallocation until its last writer
    // closes, and a thousand frozen layers each holding one made every later head's fdatasync slower
    // (docs/benchmarks.md, long chains). A read reopens the file lazily.
    this.close();
  }

  /**
   * For a commit the caller makes in its own transaction (a merge into a live layer): syncs the data now,
   * synchronously, and takes the blocks changed since the last commit.
   */
  takeDirtyDurable(): TakenBits {
    this.syncDataNow();
    const dirty = this.#dirty;
    this.#dirty = new Bitmap();
    return {
      setWritten: Bitmap.and(dirty, this.written),
      setTrimmed: Bitmap.and(dirty, this.trimmed),
      restore: () => this.#dirty.orInPlace(dirty),
    };
  }

  /** After a merge committed: the lower layer's blocks are now this layer's, and its parent is ours. */
  absorb(mergedWritten: Bitmap, mergedTrimmed: Bitmap, newParentId: number | null): void {
    this.written.orInPlace(mergedWritten);
    this.trimmed.orInPlace(mergedTrimmed);
    this.#parentId = newParentId;
  }

  /** Makes the file's data durable without blocking the event loop. */
  private async syncData(): Promise<void> {
    const fd = this.handle();
    await new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  }

  /** Synchronous variant, for the rare commit that must not yield. */
  syncDataNow(): void {
    fs.fdatasyncSync(this.handle());
  }

  // ---------------------------------------------------------------- file

  /** The open file descriptor, opened on first use: idle layers cost no descriptor until read. */
  private handle(): number {
    if (this.#fd === undefined) this.#fd = fs.openSync(this.path, 'r+');
    return this.#fd;
  }

  /** Bytes the sparse file occupies on disk. */
  allocatedBytes(): number {
    try {
      return fs.statSync(this.path).blocks * 512;
    } catch {
      return 0;
    }
  }

  close(): void {
    if (this.#fd !== undefined) {
      fs.closeSync(this.#fd);
      this.#fd = undefined;
    }
  }

  private checkLive(): void {
    if (this.#frozen) throw new Error(`internal: layer ${this.id} is frozen and takes no writes`);
  }
}
