/**
 * The /dev/fuse character device: one open file per mount, read for requests and written for replies.
 *
 * Requests are read by I/O threads (io-threads.ts), which answer file reads and writes of direct I/O sessions
 * themselves and pass everything else on to the main thread. Each passed-on request is read into its own
 * ArrayBuffer, transferred (not copied) to the main thread and handed back when it is done with. The main
 * thread writes its replies with one writev each: a write to /dev/fuse only copies into the kernel and never
 * waits on the file system.
 */
import fs from 'node:fs';
import { type IoThreadHandlers, type IoThreadLink, IoThreads, type IoThreadStats } from './io-threads.js';

export type FuseDeviceHandlers = IoThreadHandlers;

export class FuseDevice {
  private threads: IoThreads | undefined;
  private reads = false;
  private closed = false;

  private constructor(readonly fd: number) {}

  /** Opens /dev/fuse read-write. The fd is what `mount -o fd=N` hands to the kernel. */
  static open(path = '/dev/fuse'): FuseDevice {
    return new FuseDevice(fs.openSync(path, fs.constants.O_RDWR));
  }

  /**
   * Starts `threads` I/O threads and resolves once they are loaded. They read nothing until `startReading`:
   * before the mount has attached the device a read fails at once (EPERM) instead of waiting.
   */
  async startThreads(bufferSize: number, threads: number, handlers: FuseDeviceHandlers): Promise<IoThreadLink> {
    if (this.threads) throw new Error('the FUSE device already has its threads');
    this.threads = new IoThreads(this.fd, bufferSize, threads, handlers);
    try {
      await this.threads.ready;
    } catch (err) {
      this.threads.go(false);
      throw err;
    }
    return this.threads;
  }

  /** The device is mounted: the threads start reading it. */
  startReading(): void {
    if (!this.threads) throw new Error('the FUSE device has no threads');
    this.reads = true;
    this.threads.go(true);
  }

  /** Makes threads that never started reading exit (the mount failed). */
  stopUnread(): void {
    this.threads?.go(false);
  }

  /** What the I/O threads read and answered themselves so far. */
  threadStats(): IoThreadStats {
    return this.threads?.stats() ?? { requests: 0, direct: 0, bytesRead: 0, bytesWritten: 0 };
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
    return this.threads?.stopped ?? Promise.resolve();
  }

  /** Whether threads may be blocked reading the device (so only an abort or unmount stops them). */
  get reading(): boolean {
    return this.threads !== undefined && this.reads;
  }

  /**
   * Closes the fd. Call it after the threads have stopped: a thread blocked in read(2) keeps the file alive,
   * so closing under it would neither wake it nor end the connection.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
