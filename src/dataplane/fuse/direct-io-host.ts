/**
 * The main thread's side of direct I/O (storage-engine/direct-io.ts) for the volume files: one engine session
 * a volume while a file of it is open, its log shared with the I/O threads (direct-log.ts), and the engine's
 * callbacks answered on that log:
 *
 * - drain: apply the threads' log entries to the engine (session.recordWritten), in log order;
 * - exclusive: close the gate (PAUSED), wait for writes in flight, drain, let the engine change blocks, append
 *   what it changed, open the gate: the change sits in the log exactly where the engine applied it;
 * - revoke: close the gate for good, wait, drain, tell the threads; a new session starts after the engine's
 *   operation (a snapshot, a merge) is over, if a file of the volume is still open.
 */
import type { ChangedBlocks, DirectIoHost, DirectIoSession } from '../../../storage-engine/direct-io.js';
import { DEFAULT_LOG_ENTRIES, DirectLog, RENEW_POSITION, SessionState } from './direct-log.js';
import type { SharedView } from './io-thread.js';
import type { IoThreadLink, IoThreadsListener } from './io-threads.js';

/** The store call the router needs (BlockStore provides it). */
export interface DirectIoStore {
  openDirectIo(volumeId: string, host: DirectIoHost): DirectIoSession | undefined;
}

export interface DirectIoLogger {
  warn(obj: object, msg: string): void;
}

/** How long the main thread waits for a log entry an I/O thread has reserved to be filled in. */
const ENTRY_WAIT_MS = 5000;

let nextSessionId = 1;

/** A copy of `array` in shared memory, so every I/O thread reads the same bytes without a copy of its own. */
function sharedCopy<T extends Float64Array | Int32Array>(array: T): T {
  const copy = new (array.constructor as new (buffer: SharedArrayBuffer) => T)(new SharedArrayBuffer(array.byteLength));
  copy.set(array);
  return copy;
}

/** One volume's session: the engine's DirectIoHost over the shared log. */
class VolumeSession implements DirectIoHost {
  readonly id = nextSessionId++;
  readonly log: DirectLog;
  session!: DirectIoSession;
  private ended = false;

  constructor(
    readonly volumeId: string,
    private readonly router: DirectIoRouter,
    logEntries: number,
  ) {
    this.log = DirectLog.create(logEntries);
  }

  get live(): boolean {
    return !this.ended;
  }

  drain(): void {
    const log = this.log;
    let position = log.consumed;
    const tail = log.tail;
    if (position === tail) return;
    // Consecutive ranges of direct writes are recorded as one (sequential writes come in order).
    let runFirst = -1;
    let runEnd = -1;
    const flush = (): void => {
      if (runFirst >= 0) this.session.recordWritten(runFirst, runEnd);
      runFirst = -1;
    };
    const deadline = Date.now() + ENTRY_WAIT_MS;
    while (position < tail) {
      const entry = log.read(position);
      if (entry === 'pending') {
        // An I/O thread reserved this entry and is filling it in right now.
        if (Date.now() > deadline) throw new Error(`direct I/O log entry ${position} was never published`);
        log.waitForEntry(position, 1);
        continue;
      }
      if (entry === 'overwritten') throw new Error(`internal: direct I/O log entry ${position} overwritten unread`);
      if (!entry.fromMain) {
        if (runFirst >= 0 && entry.first === runEnd) runEnd = entry.end;
        else {
          flush();
          runFirst = entry.first;
          runEnd = entry.end;
        }
      }
      position++;
    }
    flush();
    log.markConsumed(position);
    if (position >= RENEW_POSITION - log.entries) this.router.renewSoon(this.volumeId);
  }

  revoke(): void {
    this.stop();
    this.router.sessionEnded(this, true);
  }

  exclusive(change: () => void, changed: readonly ChangedBlocks[]): void {
    const log = this.log;
    log.setState(SessionState.PAUSED);
    let appended = true;
    try {
      log.waitForWriters(() => this.drain());
      this.drain();
      change();
      for (const [first, end, toHead] of changed) {
        appended &&= log.append(first, end, toHead, true, undefined);
      }
    } catch (err) {
      this.end();
      throw err;
    }
    // Positions ran out: the threads cannot hear of this change, so they must stop reading through the log.
    if (!appended) this.end();
    else log.setState(SessionState.LIVE);
  }

  /** A view for the threads, exact at the log position it names. */
  view(): SharedView {
    this.drain();
    const v = this.session.view();
    return {
      blockSize: v.blockSize,
      capacityBytes: v.capacityBytes,
      headId: v.head.id,
      layerPaths: [...v.layerPaths],
      starts: sharedCopy(v.starts),
      ends: sharedCopy(v.ends),
      owners: sharedCopy(v.owners),
      engineWriteStarts: sharedCopy(v.engineWriteStarts),
      engineWriteEnds: sharedCopy(v.engineWriteEnds),
      position: this.log.consumed,
    };
  }

  /** Ends the session from this side (file closed, renewal, shutdown). */
  end(): void {
    if (this.ended) return;
    this.stop();
    this.session.close();
    this.router.sessionEnded(this, false);
  }

  /** Closes the gate for good and records every direct write that made it through. */
  private stop(): void {
    if (this.ended) return;
    this.ended = true;
    this.log.setState(SessionState.ENDED);
    this.log.waitForWriters(() => this.drain());
    this.drain();
  }
}

/**
 * Which volumes the I/O threads serve directly, and their sessions. Volume files report opens and releases;
 * a READ or WRITE that reached the main thread reports itself, so a session that ended is started again.
 */
export class DirectIoRouter implements IoThreadsListener {
  private readonly sessions = new Map<string, VolumeSession>();
  /** Open file handles by volume. */
  private readonly handles = new Map<string, Set<number>>();
  private readonly volumeOf = new Map<number, string>();
  private readonly renewing = new Set<string>();
  private closed = false;

  constructor(
    private readonly store: DirectIoStore,
    private readonly threads: IoThreadLink,
    private readonly logger: DirectIoLogger,
    /**
     * Whether the I/O threads may answer this volume's reads and writes instead of the main thread's FUSE
     * dispatcher. Say no for a volume whose requests must be admitted there (I/O limits); call `reconsider`
     * when the answer changes.
     */
    private readonly serveDirectly: (volumeId: string) => boolean = () => true,
    private readonly logEntries = DEFAULT_LOG_ENTRIES,
  ) {
    threads.setListener(this);
  }

  /** `serveDirectly` may answer differently for the volume now: end or start its session accordingly. */
  reconsider(volumeId: string): void {
    if (!this.serveDirectly(volumeId)) this.sessions.get(volumeId)?.end();
    else this.start(volumeId);
  }

  /** A file of `volumeId` was opened as `fh`; call before the OPEN reply goes out. */
  opened(fh: number, nodeid: number, volumeId: string): void {
    if (this.closed) return;
    const set = this.handles.get(volumeId) ?? new Set<number>();
    this.handles.set(volumeId, set);
    set.add(fh);
    this.volumeOf.set(fh, volumeId);
    this.threads.broadcast({ t: 'handle', fh, nodeid, volumeId });
    this.start(volumeId);
  }

  released(fh: number): void {
    const volumeId = this.volumeOf.get(fh);
    if (volumeId === undefined) return;
    this.volumeOf.delete(fh);
    this.threads.broadcast({ t: 'release', fh });
    const set = this.handles.get(volumeId);
    set?.delete(fh);
    if (set && set.size === 0) {
      this.handles.delete(volumeId);
      this.sessions.get(volumeId)?.end();
    }
  }

  /** A READ or WRITE of the volume was served on the main thread: start a session again if there is none. */
  servedOnMain(volumeId: string): void {
    this.start(volumeId);
  }

  /** Ends every session and serves nothing directly any more. */
  close(): void {
    this.closed = true;
    for (const s of [...this.sessions.values()]) s.end();
    this.threads.setListener(undefined);
  }

  drainAsked(volumeId: string, sessionId: number): void {
    const s = this.sessions.get(volumeId);
    if (s?.id !== sessionId) return;
    try {
      s.drain();
    } catch (err) {
      this.logger.warn({ err, volumeId }, 'applying direct writes failed; ending the direct I/O session');
      s.end();
    }
  }

  resyncAsked(volumeId: string, sessionId: number, thread: number): void {
    const s = this.sessions.get(volumeId);
    if (s?.id !== sessionId || !s.live) return;
    this.threads.send(thread, { t: 'view', volumeId, id: s.id, view: s.view() });
  }

  /** Called by a session once it has ended. */
  sessionEnded(s: VolumeSession, byEngine: boolean): void {
    if (this.sessions.get(s.volumeId) === s) this.sessions.delete(s.volumeId);
    this.threads.broadcast({ t: 'end', volumeId: s.volumeId, id: s.id });
    // The engine ends sessions before it changes the chain; start the next one once that change is done.
    if (byEngine) setImmediate(() => this.start(s.volumeId));
  }

  /** Positions of a session's log run out after 2^30 entries: start a fresh session. */
  renewSoon(volumeId: string): void {
    if (this.renewing.has(volumeId)) return;
    this.renewing.add(volumeId);
    setImmediate(() => {
      this.renewing.delete(volumeId);
      this.sessions.get(volumeId)?.end();
      this.start(volumeId);
    });
  }

  private start(volumeId: string): void {
    if (this.closed || this.sessions.has(volumeId) || !this.handles.has(volumeId)) return;
    if (!this.serveDirectly(volumeId)) return;
    const s = new VolumeSession(volumeId, this, this.logEntries);
    let session: DirectIoSession | undefined;
    try {
      session = this.store.openDirectIo(volumeId, s);
    } catch (err) {
      this.logger.warn({ err, volumeId }, 'no direct I/O session; the main thread serves the volume');
      return;
    }
    // Undefined: the engine is merging into the volume's head; the next request served here asks again.
    if (!session) return;
    s.session = session;
    this.sessions.set(volumeId, s);
    this.threads.broadcast({ t: 'session', volumeId, id: s.id, log: s.log.buffer, view: s.view() });
  }
}
