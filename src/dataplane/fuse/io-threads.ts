/**
 * The I/O threads of one FUSE connection (io-thread.ts), seen from the main thread: starts them, hands the
 * requests they pass on to the main thread's handler, takes request buffers back, and carries control
 * messages to them (sessions, file handles).
 *
 * A read of /dev/fuse blocks until the kernel has a request, so the reads happen on these threads, never on
 * libuv's shared threadpool (each outstanding read would pin one of its four threads). Several threads read
 * the same descriptor; the kernel gives each request to one of them. FUSE_DEV_IOC_CLONE would give each its
 * own queue, but it is an ioctl(2), which Node cannot issue without a native addon.
 */
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { MessageChannel, type MessagePort, Worker } from 'node:worker_threads';
import { type FromIoThread, type IoThreadData, STATS_PER_THREAD, Stat, type ToIoThread } from './io-thread.js';

/** What the threads ask of the main thread besides requests. */
export interface IoThreadsListener {
  /** A session's log is half full: apply it to the engine. */
  drainAsked(volumeId: string, sessionId: number): void;
  /** Thread `thread` fell a whole log behind on a session and needs a fresh view. */
  resyncAsked(volumeId: string, sessionId: number, thread: number): void;
}

/** The main thread's way to the threads, for whoever serves files directly through them. */
export interface IoThreadLink {
  readonly count: number;
  broadcast(msg: ToIoThread): void;
  send(thread: number, msg: ToIoThread): void;
  setListener(listener: IoThreadsListener | undefined): void;
}

export interface IoThreadHandlers {
  /** One request for the main thread, as read. Call `done()` once the buffer is no longer referenced. */
  onRequest(request: Buffer, done: () => void): void;
  /** The threads stopped: `undefined` after unmount/abort (ENODEV), else the first error. */
  onEnd(error: Error | undefined): void;
}

/** Totals over the threads (requests they read, and what they answered themselves). */
export interface IoThreadStats {
  requests: number;
  direct: number;
  bytesRead: number;
  bytesWritten: number;
}

/**
 * Loads io-thread.ts in a worker. From the TypeScript sources (tests, tsx) the worker registers tsx first;
 * the compiled build loads io-thread.js as it is.
 */
const BOOTSTRAP = `
const { workerData, parentPort } = require('node:worker_threads');
(async () => {
  if (workerData.tsx) (await import(workerData.tsx)).register();
  await import(workerData.module);
})().catch((err) => {
  parentPort.postMessage({ kind: 'error', code: 'EBOOT', message: String((err && err.stack) || err) });
});
`;

/** tsx's ESM API (its `import` export), found from this file. */
function tsxApi(from: string): string {
  const resolve = (import.meta as { resolve?: (specifier: string) => string }).resolve;
  if (typeof resolve === 'function') return resolve('tsx/esm/api');
  // Where import.meta.resolve is missing (vitest), the require export names the same file as .cjs.
  return pathToFileURL(
    createRequire(from)
      .resolve('tsx/esm/api')
      .replace(/\.cjs$/, '.mjs'),
  ).href;
}

function threadModule(): { module: string; tsx: string | undefined } {
  const here = import.meta.url;
  if (here.endsWith('.ts')) return { module: new URL('./io-thread.ts', here).href, tsx: tsxApi(here) };
  return { module: new URL('./io-thread.js', here).href, tsx: undefined };
}

export class IoThreads implements IoThreadLink {
  private readonly workers: Worker[] = [];
  private readonly controlPorts: MessagePort[] = [];
  /** [0] control generation, [1] 0 waiting / 1 reading / -1 exit (see IoThreadData). */
  private readonly control = new Int32Array(new SharedArrayBuffer(8));
  private readonly statsBuffer: SharedArrayBuffer;
  private listener: IoThreadsListener | undefined;
  private closed = false;
  readonly stopped: Promise<void>;
  /** Resolves once every thread has loaded; rejects if one failed to. */
  readonly ready: Promise<void>;

  constructor(fd: number, bufferSize: number, count: number, handlers: IoThreadHandlers) {
    if (!Number.isInteger(count) || count < 1) throw new RangeError('at least one I/O thread is needed');
    this.statsBuffer = new SharedArrayBuffer(count * STATS_PER_THREAD * 8);
    const { module, tsx } = threadModule();
    let endReported = false;
    const reportEnd = (err: Error | undefined): void => {
      if (endReported) return;
      endReported = true;
      handlers.onEnd(err);
    };
    const exits: Array<Promise<void>> = [];
    let readyCount = 0;
    let markReady!: () => void;
    let failReady!: (err: Error) => void;
    this.ready = new Promise<void>((resolve, reject) => {
      markReady = resolve;
      failReady = reject;
    });
    this.ready.catch(() => undefined);
    for (let thread = 0; thread < count; thread++) {
      const requests = new MessageChannel();
      const controls = new MessageChannel();
      const ioThread: IoThreadData = {
        thread,
        fd,
        bufferSize,
        returnPort: requests.port2,
        controlPort: controls.port2,
        control: this.control.buffer as SharedArrayBuffer,
        stats: this.statsBuffer,
        maxPooled: 32,
      };
      const worker = new Worker(BOOTSTRAP, {
        eval: true,
        workerData: { module, tsx, ioThread },
        transferList: [requests.port2, controls.port2],
        name: `fuse-io-${thread}`,
      });
      this.workers.push(worker);
      this.controlPorts.push(controls.port1);
      const returnPort = requests.port1;
      worker.on('message', (msg: FromIoThread) => {
        switch (msg.kind) {
          case 'request': {
            const buffer = msg.buffer;
            handlers.onRequest(Buffer.from(buffer, 0, msg.length), () => {
              if (!this.closed) returnPort.postMessage(buffer, [buffer]);
            });
            break;
          }
          case 'drain':
            this.listener?.drainAsked(msg.volumeId, msg.id);
            break;
          case 'resync':
            this.listener?.resyncAsked(msg.volumeId, msg.id, msg.thread);
            break;
          case 'ready':
            if (++readyCount === count) markReady();
            break;
          case 'end':
            reportEnd(undefined);
            break;
          case 'error': {
            const err = Object.assign(new Error(`FUSE I/O thread: ${msg.message}`), { code: msg.code });
            failReady(err);
            reportEnd(err);
            break;
          }
        }
      });
      worker.on('error', (err) => {
        failReady(err);
        reportEnd(err);
      });
      exits.push(
        new Promise<void>((resolve) =>
          worker.on('exit', () => {
            returnPort.close();
            controls.port1.close();
            resolve();
          }),
        ),
      );
    }
    this.stopped = Promise.all(exits).then(() => {
      this.closed = true;
      failReady(new Error('FUSE I/O threads exited before they were ready'));
      reportEnd(undefined);
    });
  }

  /** Lets the threads read the device (once it is mounted), or with `false` makes them exit unread. */
  go(read = true): void {
    Atomics.store(this.control, 1, read ? 1 : -1);
    Atomics.notify(this.control, 1);
  }

  get count(): number {
    return this.workers.length;
  }

  setListener(listener: IoThreadsListener | undefined): void {
    this.listener = listener;
  }

  /** Posts to every thread; they pick it up before they handle their next request. */
  broadcast(msg: ToIoThread): void {
    if (this.closed) return;
    for (const port of this.controlPorts) port.postMessage(msg);
    Atomics.add(this.control, 0, 1);
  }

  send(thread: number, msg: ToIoThread): void {
    if (this.closed) return;
    this.controlPorts[thread]?.postMessage(msg);
    Atomics.add(this.control, 0, 1);
  }

  stats(): IoThreadStats {
    const s = new Float64Array(this.statsBuffer);
    const total: IoThreadStats = { requests: 0, direct: 0, bytesRead: 0, bytesWritten: 0 };
    for (let t = 0; t < this.workers.length; t++) {
      const at = t * STATS_PER_THREAD;
      total.requests += s[at + Stat.requests]!;
      total.direct += s[at + Stat.direct]!;
      total.bytesRead += s[at + Stat.bytesRead]!;
      total.bytesWritten += s[at + Stat.bytesWritten]!;
    }
    return total;
  }
}
