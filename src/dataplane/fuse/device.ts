/**
 * The /dev/fuse character device: one open file per mount, read for requests and written for replies.
 *
 * A read of /dev/fuse blocks until the kernel has a request. Doing that on libuv's threadpool would pin
 * one of its (default four) threads per outstanding read and starve every other fs and crypto call of
 * the process, so reads happen on a dedicated worker thread that loops over blocking readSync calls.
 * Each request is read into its own ArrayBuffer, which is transferred (not copied) to the main thread;
 * the main thread hands it back through a second channel when it is done with it, and the worker picks
 * returned buffers up synchronously before each read. Replies are written from the main thread with one
 * writev a reply: a write to /dev/fuse only copies into the kernel and never waits on the file system.
 */
import fs from 'node:fs';
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';

/** What the reader thread tells the main thread. */
type ReaderMessage =
  | { kind: 'request'; buffer: ArrayBuffer; length: number }
  | { kind: 'end' }
  | { kind: 'error'; code: string; message: string };

/**
 * Source of the reader thread. It is plain JavaScript evaluated in the worker (not a module file) so it
 * runs the same under tsx, vitest and the compiled dist/ build without a loader.
 */
const READER_SOURCE = `
'use strict';
const fs = require('node:fs');
const { workerData, parentPort, receiveMessageOnPort } = require('node:worker_threads');
const { fd, bufferSize, returnPort, maxPooled } = workerData;
const pool = [];
for (;;) {
  for (let m = receiveMessageOnPort(returnPort); m; m = receiveMessageOnPort(returnPort)) {
    if (pool.length < maxPooled) pool.push(m.message);
  }
  const buffer = pool.pop() || new ArrayBuffer(bufferSize);
  let length;
  try {
    length = fs.readSync(fd, new Uint8Array(buffer), 0, bufferSize, null);
  } catch (err) {
    pool.push(buffer);
    // ENOENT: the request was interrupted and withdrawn before we read it. EINTR/EAGAIN: try again.
    if (err.code === 'ENOENT' || err.code === 'EINTR' || err.code === 'EAGAIN') continue;
    // ENODEV: the file system was unmounted or the connection aborted; this is the normal end.
    if (err.code === 'ENODEV') { parentPort.postMessage({ kind: 'end' }); break; }
    parentPort.postMessage({ kind: 'error', code: String(err.code), message: String(err.message) });
    break;
  }
  parentPort.postMessage({ kind: 'request', buffer, length }, [buffer]);
}
`;

export interface FuseDeviceHandlers {
  /** One request, as read. Call `done()` once the request buffer is no longer referenced. */
  onRequest(request: Buffer, done: () => void): void;
  /** The reader stopped: `undefined` after unmount/abort (ENODEV), else the read error. */
  onEnd(error: Error | undefined): void;
}

export class FuseDevice {
  private reader: Worker | undefined;
  private returnPort: MessagePort | undefined;
  private ended: Promise<void> | undefined;
  private closed = false;

  private constructor(readonly fd: number) {}

  /** Opens /dev/fuse read-write. The fd is what `mount -o fd=N` hands to the kernel. */
  static open(path = '/dev/fuse'): FuseDevice {
    return new FuseDevice(fs.openSync(path, fs.constants.O_RDWR));
  }

  /**
   * Starts the reader thread. Only call this after the mount has attached the device: before that a read
   * fails at once (EPERM) instead of waiting.
   */
  startReading(bufferSize: number, handlers: FuseDeviceHandlers): void {
    if (this.reader) throw new Error('the FUSE device is already being read');
    const { port1, port2 } = new MessageChannel();
    this.returnPort = port1;
    const reader = new Worker(READER_SOURCE, {
      eval: true,
      workerData: { fd: this.fd, bufferSize, returnPort: port2, maxPooled: 32 },
      transferList: [port2],
      name: 'fuse-reader',
    });
    this.reader = reader;
    let endReported = false;
    const reportEnd = (err: Error | undefined): void => {
      if (endReported) return;
      endReported = true;
      handlers.onEnd(err);
    };
    this.ended = new Promise<void>((resolve) => {
      reader.on('message', (msg: ReaderMessage) => {
        if (msg.kind === 'request') {
          const buffer = msg.buffer;
          handlers.onRequest(Buffer.from(buffer, 0, msg.length), () => this.recycle(buffer));
        } else if (msg.kind === 'end') {
          reportEnd(undefined);
        } else {
          reportEnd(Object.assign(new Error(`reading /dev/fuse: ${msg.message}`), { code: msg.code }));
        }
      });
      reader.on('error', (err) => reportEnd(err));
      reader.on('exit', () => {
        reportEnd(undefined);
        port1.close();
        resolve();
      });
    });
  }

  private recycle(buffer: ArrayBuffer): void {
    if (this.returnPort && !this.closed) this.returnPort.postMessage(buffer, [buffer]);
  }

  /** Writes one complete message (a reply or a notification) in one system call. */
  writeMessage(parts: readonly Buffer[]): void {
    fs.writevSync(this.fd, parts as Buffer[]);
  }

  /**
   * Writes a notification from the threadpool. Notifications that invalidate names take the directory
   * lock; writing them from the main thread could wait on a LOOKUP that only the main thread can answer.
   */
  writeNotification(message: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.write(this.fd, message, 0, message.length, null, (err) => (err ? reject(err) : resolve()));
    });
  }

  /** Resolves when the reader thread has exited (after unmount or abort), at once if it never started. */
  whenReaderStopped(): Promise<void> {
    return this.ended ?? Promise.resolve();
  }

  get reading(): boolean {
    return this.reader !== undefined;
  }

  /**
   * Closes the fd. Call it after the reader has stopped: a thread blocked in read(2) keeps the file alive,
   * so closing under it would neither wake it nor end the connection.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
