/**
 * A layer: one sparse data file (block i at byte i × blockSize, so no mapping table) and two disjoint
 * roaring bitmaps saying which blocks it holds as data (`written`) or as zeros (`trimmed`).
 * The bitmaps are the truth (invariant 4): bytes in the file at a position with no bit are never read.
 *
 * Changes made since the last catalog commit are tracked in `dirty`; a flush makes the file durable
 * and only then commits the dirty blocks' bits, so a bit never points at data that could be lost.
 */
import fs from 'node:fs';
import { Bitmap } from './bitmap.js';
import { translateIoError } from './errors.js';

export class Layer {
  /** Blocks whose bits changed since the last commit to the catalog. */
  dirty = new Bitmap();
  /** Counts writes and trims, so a freeze can tell whether any landed after its asynchronous sync. */
  writeSeq = 0;
  /** Tail of this layer's commit queue (see `exclusive`). */
  private commitTail: Promise<unknown> = Promise.resolve();
  private fd: number | undefined;

  constructor(
    readonly id: number,
    public parentId: number | null,
    readonly blockSize: number,
    readonly path: string,
    /** Blocks this layer holds as data. */
    readonly written: Bitmap,
    /** Blocks this layer holds as zeros (trimmed), disjoint from written. */
    readonly trimmed: Bitmap,
    /** Frozen layers belong to snapshots (or hidden history) and take no more writes, only merges. */
    public frozen: boolean,
  ) {}

  /**
   * Runs `fn` after every earlier commit task of this layer. Every change to the layer's persisted bits
   * (flush, freeze, merge) goes through here, so an older captured change can never land after a newer one.
   */
  exclusive<T>(fn: () => Promise<T> | T): Promise<T> {
    const run = this.commitTail.then(fn, fn);
    this.commitTail = run.catch(() => undefined);
    return run;
  }

  /** Whether the layer answers for block i (with data or with zeros). */
  holds(block: number): boolean {
    return this.written.has(block) || this.trimmed.has(block);
  }

  /** The open file descriptor, opened on first use: idle layers cost no descriptor until read. */
  handle(): number {
    if (this.fd === undefined) this.fd = fs.openSync(this.path, 'r+');
    return this.fd;
  }

  /** Reads `length` bytes at byte `position` of the file into `target` at `targetOffset`. */
  readInto(target: Uint8Array, targetOffset: number, length: number, position: number): void {
    let done = 0;
    const fd = this.handle();
    while (done < length) {
      const n = fs.readSync(fd, target, targetOffset + done, length - done, position + done);
      // A sparse file past its end reads short: those bytes are holes, and holes are zeros.
      if (n === 0) {
        target.fill(0, targetOffset + done, targetOffset + length);
        return;
      }
      done += n;
    }
  }

  /** Writes `data` at byte `position` of the file. */
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

  /** Marks blocks [first, end) as written here. */
  markWritten(first: number, end: number): void {
    this.written.addRange(first, end);
    this.trimmed.removeRange(first, end);
    this.dirty.addRange(first, end);
    this.writeSeq++;
  }

  /** Marks blocks [first, end) as trimmed (zeros) here. */
  markTrimmed(first: number, end: number): void {
    this.trimmed.addRange(first, end);
    this.written.removeRange(first, end);
    this.dirty.addRange(first, end);
    this.writeSeq++;
  }

  /** Makes the file's data durable without blocking the event loop. */
  async syncData(): Promise<void> {
    const fd = this.handle();
    await new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  }

  /** Synchronous variant, for the rare commit that must not yield. */
  syncDataNow(): void {
    fs.fdatasyncSync(this.handle());
  }

  /** Bytes the sparse file occupies on disk. */
  allocatedBytes(): number {
    try {
      return fs.fstatSync(this.handle()).blocks * 512;
    } catch {
      return 0;
    }
  }

  close(): void {
    if (this.fd !== undefined) {
      fs.closeSync(this.fd);
      this.fd = undefined;
    }
  }
}
