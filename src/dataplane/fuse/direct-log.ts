/**
 * The shared memory of one direct I/O session (storage-engine/direct-io.ts), between the main thread and the
 * I/O threads: a gate for direct writes and a log of block changes.
 *
 * The log is a ring of entries "blocks [first, end) now read from the head" (or "as zeros"), in one order
 * every thread agrees on. I/O threads append an entry after each direct write returned and before they
 * answer the kernel; the main thread appends one after each change the engine made itself. The main thread
 * applies the I/O threads' entries to the engine (`consumed` says how far); each I/O thread applies all of
 * them to its copy of the index before it serves a read, so a read sees every write answered before it.
 *
 * Positions only grow within a session and stay below 2^30, so they fit the Int32Array the atomics need;
 * a session that gets near that is renewed by the main thread.
 */

/** Indexes into the session's Int32 header. */
const STATE = 0;
/** Direct writes between their gate check and their log entry. */
const INFLIGHT = 1;
/** Next position to reserve. */
const TAIL = 2;
/** Every entry before this position was applied to the engine by the main thread. */
const CONSUMED = 3;
/** 1 once an I/O thread asked the main thread to drain, until it did. */
const DRAIN_ASKED = 4;
const HEADER_INTS = 16;

export const SessionState = {
  /** Direct reads and writes allowed. */
  LIVE: 1,
  /** The main thread is changing blocks itself: direct writes go to the main thread meanwhile. */
  PAUSED: 2,
  /** Over: everything goes to the main thread. */
  ENDED: 0,
} as const;

/** Entry kind bits. */
const TO_HEAD = 1;
const FROM_MAIN = 2;

/** Positions at which a session should be renewed, well below 2^31. */
export const RENEW_POSITION = 1 << 30;

/** Default ring size: entries an I/O thread may be ahead of the main thread's draining. */
export const DEFAULT_LOG_ENTRIES = 1 << 16;

export interface LogEntry {
  first: number;
  end: number;
  toHead: boolean;
  fromMain: boolean;
}

/** What reading an entry at a position found. */
export type EntryRead = 'pending' | 'overwritten' | LogEntry;

/** Typed views over a session's shared buffer; every thread builds its own from the same buffer. */
export class DirectLog {
  readonly header: Int32Array;
  private readonly seq: Int32Array;
  private readonly kinds: Int32Array;
  private readonly firsts: Float64Array;
  private readonly ends: Float64Array;
  readonly entries: number;
  private readonly mask: number;

  constructor(readonly buffer: SharedArrayBuffer) {
    const entries = DirectLog.entriesOf(buffer);
    this.entries = entries;
    this.mask = entries - 1;
    let at = 0;
    this.header = new Int32Array(buffer, at, HEADER_INTS);
    at += HEADER_INTS * 4;
    this.firsts = new Float64Array(buffer, at, entries);
    at += entries * 8;
    this.ends = new Float64Array(buffer, at, entries);
    at += entries * 8;
    this.seq = new Int32Array(buffer, at, entries);
    at += entries * 4;
    this.kinds = new Int32Array(buffer, at, entries);
  }

  /** A new session's buffer, LIVE, with `entries` (a power of two) slots. */
  static create(entries = DEFAULT_LOG_ENTRIES): DirectLog {
    if (entries < 2 || (entries & (entries - 1)) !== 0) throw new RangeError('log entries must be a power of two');
    const log = new DirectLog(new SharedArrayBuffer(HEADER_INTS * 4 + entries * 24));
    Atomics.store(log.header, STATE, SessionState.LIVE);
    return log;
  }

  private static entriesOf(buffer: SharedArrayBuffer): number {
    return (buffer.byteLength - HEADER_INTS * 4) / 24;
  }

  get state(): number {
    return Atomics.load(this.header, STATE);
  }

  setState(state: number): void {
    Atomics.store(this.header, STATE, state);
  }

  get tail(): number {
    return Atomics.load(this.header, TAIL);
  }

  get consumed(): number {
    return Atomics.load(this.header, CONSUMED);
  }

  // ------------------------------------------------------------ the gate (I/O threads)

  /** Enters the gate for a direct write; false (and not entered) unless the session is LIVE. */
  enter(): boolean {
    Atomics.add(this.header, INFLIGHT, 1);
    if (Atomics.load(this.header, STATE) === SessionState.LIVE) return true;
    this.leave();
    return false;
  }

  leave(): void {
    if (Atomics.sub(this.header, INFLIGHT, 1) === 1) Atomics.notify(this.header, INFLIGHT);
  }

  // ------------------------------------------------------------ the gate (main thread)

  /**
   * Waits until no direct write is inside the gate (call after leaving LIVE), running `drain` meanwhile so
   * that a writer waiting for room in the log can finish.
   */
  waitForWriters(drain: () => void): void {
    for (;;) {
      drain();
      const inflight = Atomics.load(this.header, INFLIGHT);
      if (inflight === 0) return;
      Atomics.wait(this.header, INFLIGHT, inflight, 1);
    }
  }

  // ------------------------------------------------------------ appending

  /**
   * Appends an entry. Returns false if the log is full (the main thread has not consumed enough) and `wait`
   * says not to wait, or if the session's positions ran out; the caller then does not count the change as made.
   */
  append(first: number, end: number, toHead: boolean, fromMain: boolean, wait: (() => boolean) | undefined): boolean {
    const header = this.header;
    let position: number;
    for (;;) {
      position = Atomics.load(header, TAIL);
      if (position >= RENEW_POSITION) return false;
      const consumed = Atomics.load(header, CONSUMED);
      if (position - consumed >= this.entries) {
        if (!wait?.()) return false;
        continue;
      }
      if (Atomics.compareExchange(header, TAIL, position, position + 1) === position) break;
    }
    const slot = position & this.mask;
    this.firsts[slot] = first;
    this.ends[slot] = end;
    this.kinds[slot] = (toHead ? TO_HEAD : 0) | (fromMain ? FROM_MAIN : 0);
    Atomics.store(this.seq, slot, position + 1);
    Atomics.notify(this.seq, slot);
    return true;
  }

  /** For a writer that found the log full: blocks until the main thread consumed more (or `ms` passed). */
  waitForRoom(ms: number): void {
    const consumed = Atomics.load(this.header, CONSUMED);
    if (Atomics.load(this.header, TAIL) - consumed < this.entries) return;
    Atomics.wait(this.header, CONSUMED, consumed, ms);
  }

  /** Whether the main thread should be asked to drain (once, until it has): the log is half full. */
  shouldAskForDrain(): boolean {
    if (Atomics.load(this.header, TAIL) - Atomics.load(this.header, CONSUMED) < this.entries >> 1) return false;
    return Atomics.compareExchange(this.header, DRAIN_ASKED, 0, 1) === 0;
  }

  // ------------------------------------------------------------ reading

  /** The entry at `position`, if it is published and still there. */
  read(position: number): EntryRead {
    const slot = position & this.mask;
    const seq = Atomics.load(this.seq, slot);
    if (seq < position + 1) return 'pending';
    if (seq > position + 1) return 'overwritten';
    const first = this.firsts[slot]!;
    const end = this.ends[slot]!;
    const kind = this.kinds[slot]!;
    // A writer lapping a slow reader reserves the slot's next position (TAIL moves) before it rewrites the
    // slot, and publishes the new seq only after: so the seq alone cannot tell a half-rewritten slot from the
    // entry we want. Once the next position is reserved, what we copied may be torn.
    if (Atomics.load(this.seq, slot) !== position + 1) return 'overwritten';
    if (Atomics.load(this.header, TAIL) > position + this.entries) return 'overwritten';
    return { first, end, toHead: (kind & TO_HEAD) !== 0, fromMain: (kind & FROM_MAIN) !== 0 };
  }

  /** Waits (up to `ms`) for the entry at `position` to be published. */
  waitForEntry(position: number, ms: number): void {
    const slot = position & this.mask;
    const seq = Atomics.load(this.seq, slot);
    if (seq >= position + 1) return;
    Atomics.wait(this.seq, slot, seq, ms);
  }

  /** The main thread applied every entry before `position`: writers waiting for room may go on. */
  markConsumed(position: number): void {
    Atomics.store(this.header, CONSUMED, position);
    Atomics.store(this.header, DRAIN_ASKED, 0);
    Atomics.notify(this.header, CONSUMED);
  }
}
