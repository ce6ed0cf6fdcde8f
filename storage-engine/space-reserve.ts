/**
 * The space reserve: deletes must work on a full disk, yet even a delete needs a little space (the
 * catalog appends its commit to the write-ahead log). The store keeps a preallocated file,
 * `space.reserve`, and gives it back when a catalog commit that frees space fails for lack of room; the
 * commit is then retried. The reserve is taken again once the disk has room for it and some to spare.
 *
 * The same accounting keeps new objects and compaction's copies from spending the last free bytes:
 * creates are refused (NoSpaceError) while the reserve cannot be held, and a merge is not started unless
 * the disk has room for its copy without touching the reserve.
 */
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { NoSpaceError, isNoSpace, translateIoError } from './errors.js';
import { eventSink, type EmitEvent } from './events.js';
import type { StoreOptions } from './types.js';

/** The reserve file, in the store directory. */
export const RESERVE_FILE = 'space.reserve';
/** Default reserve: several times what a burst of delete commits appends to the catalog's log. */
export const DEFAULT_SPACE_RESERVE_BYTES = 4 * 1024 * 1024;
/** Free bytes, beyond the reserve, below which the disk counts as full for creates. */
export const CREATE_HEADROOM_BYTES = 1024 * 1024;
const CHUNK_BYTES = 1024 * 1024;

/** The store's reserve of disk space and the checks that protect it. */
export class SpaceReserve {
  private readonly file: string;
  private readonly bytes: number;
  private readonly emit: EmitEvent;
  private isHeld = false;

  constructor(
    private readonly dir: string,
    options: Pick<StoreOptions, 'spaceReserveBytes' | 'onEvent'>,
  ) {
    const bytes = options.spaceReserveBytes ?? DEFAULT_SPACE_RESERVE_BYTES;
    if (!Number.isSafeInteger(bytes) || bytes < 0)
      throw new TypeError('spaceReserveBytes must be an integer, 0 or more');
    this.bytes = bytes;
    this.file = path.join(dir, RESERVE_FILE);
    this.emit = eventSink(options.onEvent);
    // A reserve being written when the process was killed: never complete, so never worth keeping.
    fs.rmSync(`${this.file}.tmp`, { force: true });
    this.isHeld = this.bytes === 0 || this.complete();
    // A store made readable (an earlier version, a careless copy): the reserve is a store file, 0600 too.
    if (this.bytes > 0 && this.isHeld) fs.chmodSync(this.file, 0o600);
    if (!this.isHeld) this.restore();
  }

  /** Whether the reserve is in place (always true when it is turned off). */
  get held(): boolean {
    return this.isHeld;
  }

  /**
   * Free bytes on the disk under the store, as `df` shows them (Available). Root could also use blocks the
   * filesystem keeps for root, but ext4 refuses writes before its free count reaches zero, so the
   * conservative figure is the one that predicts ENOSPC.
   */
  freeBytes(): number {
    const s = fs.statfsSync(this.dir);
    return s.bavail * s.bsize;
  }

  /** Takes the reserve again if the disk has room for it and the headroom; returns whether it is held. */
  restore(): boolean {
    if (this.isHeld) return true;
    if (this.freeBytes() < this.bytes + CREATE_HEADROOM_BYTES) return false;
    if (!this.write()) return false;
    this.isHeld = true;
    this.emit({ type: 'space-reserve-restored', bytes: this.bytes });
    return true;
  }

  /**
   * Runs `fn`, a catalog commit that frees space (a delete); if the disk is too full for it, gives the
   * reserve back and runs it once more. Still full (no reserve left): NoSpaceError.
   */
  freeing<T>(what: string, fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      if (!isNoSpace(err) || !this.release(what)) return translateIoError(err, what);
    }
    try {
      return fn();
    } catch (err) {
      return translateIoError(err, what);
    }
  }

  /** `freeing` for an asynchronous commit of space already spent (a flush at close, when the disk is full). */
  async freeingAsync<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (!isNoSpace(err) || !this.release(what)) return translateIoError(err, what);
    }
    try {
      return await fn();
    } catch (err) {
      return translateIoError(err, what);
    }
  }

  /** Refuses a create while the disk is full: the reserve cannot be held, or less than the headroom is free. */
  checkRoomToCreate(what: string): void {
    const held = this.restore();
    const free = this.freeBytes();
    if (!held || free < CREATE_HEADROOM_BYTES) {
      throw new NoSpaceError(
        `${what}: the disk under the store is full (${free} bytes free; ${this.bytes} bytes are kept so that deletes always work): delete snapshots or volumes to free space`,
      );
    }
  }

  /** Refuses to start a copy of `bytes` (a merge) that would leave no room for the reserve. */
  checkRoomToCopy(bytes: number, what: string): void {
    const free = this.freeBytes();
    const owed = this.isHeld ? 0 : this.bytes;
    if (free - owed < bytes + CREATE_HEADROOM_BYTES) {
      throw new NoSpaceError(`${what}: needs ${bytes} bytes but the disk under the store has ${free} free`);
    }
  }

  /** Gives the reserve back to the disk; false if there was none to give. */
  private release(what: string): boolean {
    if (!this.isHeld || this.bytes === 0) return false;
    fs.rmSync(this.file, { force: true });
    this.isHeld = false;
    this.emit({ type: 'space-reserve-released', bytes: this.bytes, for: what });
    return true;
  }

  /** Whether the reserve file exists with all its blocks allocated. */
  private complete(): boolean {
    const st = fs.lstatSync(this.file, { throwIfNoEntry: false });
    return st?.isFile() === true && st.size === this.bytes && st.blocks * 512 >= this.bytes;
  }

  /**
   * Writes the reserve file in full; false if the disk filled up meanwhile (the
   * partial file goes). The bytes are random, not zeros: compressing filesystems store zeros in no space.
   */
  private write(): boolean {
    const partial = `${this.file}.tmp`;
    fs.rmSync(partial, { force: true });
    let fd: number | undefined;
    try {
      fd = fs.openSync(
        partial,
        fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW,
        0o600,
      );
      fs.fchmodSync(fd, 0o600);
      const chunk = randomFillSync(Buffer.allocUnsafe(Math.min(CHUNK_BYTES, this.bytes)));
      for (let done = 0; done < this.bytes; ) {
        const n = Math.min(chunk.length, this.bytes - done);
        done += fs.writeSync(fd, chunk, 0, n, done);
      }
      // No fsync: the blocks are allocated (or reserved, with delayed allocation) by the writes, which is
      // all a reserve is for; after a crash, open checks the file and writes it again if it is short.
      fs.closeSync(fd);
      fd = undefined;
      fs.renameSync(partial, this.file);
      return true;
    } catch (err) {
      if (fd !== undefined) fs.closeSync(fd);
      fs.rmSync(partial, { force: true });
      if (isNoSpace(err)) return false;
      throw err;
    }
  }
}
