/**
 * The snapshot metadata client: allocated() and delta() over any transport, giving the caller one strictly
 * ordered, non-overlapping sequence of extents however often the stream is cut. A cut stream (UNAVAILABLE,
 * CANCELLED, DEADLINE_EXCEEDED: the sidecar ends streams after --max-streaming-duration-min, a driver
 * restarts) is reopened at the end of the last extent received, after a bounded exponential backoff; other
 * failures come back as the typed errors of errors.ts.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { isResumable, ProtocolError, typedError } from './errors.js';
import type {
  BlockMetadataType,
  Extent,
  ExtentListing,
  ListOptions,
  MetadataPage,
  MetadataRequest,
  MetadataTransport,
} from './types.js';

/** How cut streams are retried. */
export interface RetryPolicy {
  /** Reopens in a row without progress before giving up. Default 10. */
  maxAttempts: number;
  /** First delay; each further one doubles. Default 100 ms. */
  initialDelayMs: number;
  /** Upper bound of one delay. Default 5 s. */
  maxDelayMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 10, initialDelayMs: 100, maxDelayMs: 5000 };

/** Called before each resume, e.g. to log it. */
export type ResumeListener = (info: { offset: number; attempt: number; delayMs: number; error: unknown }) => void;

export class SnapshotMetadataClient {
  private readonly retry: RetryPolicy;

  constructor(
    private readonly transport: MetadataTransport,
    options: { retry?: Partial<RetryPolicy>; onResume?: ResumeListener } = {},
  ) {
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    this.onResume = options.onResume;
  }

  private readonly onResume: ResumeListener | undefined;

  /** The allocated extents of `snapshot`. Resolves once the driver has answered (capacity and style known). */
  allocated(snapshot: string, options: ListOptions = {}): Promise<ExtentListing> {
    return this.list(
      (startingOffset, maxResults) => ({ kind: 'allocated', snapshot, startingOffset, maxResults }),
      `allocated(${snapshot})`,
      options,
    );
  }

  /** The extents changed from `base` to `target`. Resolves once the driver has answered. */
  delta(base: string, target: string, options: ListOptions = {}): Promise<ExtentListing> {
    return this.list(
      (startingOffset, maxResults) => ({ kind: 'delta', base, target, startingOffset, maxResults }),
      `delta(${base}, ${target})`,
      options,
    );
  }

  close(): Promise<void> | void {
    return this.transport.close();
  }

  private async list(
    request: (startingOffset: number, maxResults: number) => MetadataRequest,
    what: string,
    options: ListOptions,
  ): Promise<ExtentListing> {
    const startingOffset = options.startingOffset ?? 0;
    const maxResults = options.maxResults ?? 0;
    if (!Number.isSafeInteger(startingOffset) || startingOffset < 0)
      throw new RangeError(`startingOffset must be a byte offset >= 0, got ${startingOffset}`);
    if (!Number.isSafeInteger(maxResults) || maxResults < 0)
      throw new RangeError(`maxResults must be an integer >= 0, got ${maxResults}`);
    const blockSize = options.blockSize;
    if (blockSize !== undefined && !isPowerOfTwo(blockSize)) {
      throw new RangeError(`blockSize must be a power of two, got ${blockSize}`);
    }
    const stream = new ResumingStream(
      this.transport,
      (offset) => request(offset, maxResults),
      what,
      this.retry,
      this.onResume,
      options.signal,
    );
    await stream.start(startingOffset);
    const cutter = blockSize === undefined ? undefined : new BlockCutter(blockSize, stream.capacityBytes);
    const batches: AsyncIterator<Extent[]> = {
      next: async () => {
        for (;;) {
          const r = await stream.next();
          if (r.done || !cutter) return r;
          const cut = cutter.cut(r.value);
          if (cut.length > 0) return { done: false, value: cut };
        }
      },
      return: () => stream.return(),
    };
    let iterated = false;
    const once = () => {
      if (iterated) throw new Error(`${what}: a listing can be iterated once`);
      iterated = true;
    };
    return {
      capacityBytes: stream.capacityBytes,
      blockMetadataType: stream.blockMetadataType,
      get resumes() {
        return stream.resumes;
      },
      batches() {
        once();
        return { [Symbol.asyncIterator]: () => batches };
      },
      [Symbol.asyncIterator]() {
        once();
        return oneByOne(batches);
      },
    };
  }
}

/**
 * The extents of a batch iterator one at a time. Hand-written rather than an async generator: an extent
 * already received costs one resolved promise, no generator resumption.
 */
function oneByOne(batches: AsyncIterator<Extent[]>): AsyncIterator<Extent> {
  let buffer: Extent[] = [];
  let at = 0;
  const refill = async (): Promise<IteratorResult<Extent>> => {
    const r = await batches.next();
    if (r.done) return { done: true, value: undefined };
    buffer = r.value;
    at = 1;
    return { done: false, value: buffer[0]! };
  };
  return {
    next: () => (at < buffer.length ? Promise.resolve({ done: false, value: buffer[at++]! }) : refill()),
    return: async () => {
      buffer = [];
      await batches.return?.();
      return { done: true, value: undefined };
    },
  };
}

/** One logical listing over as many transport streams as it takes. */
class ResumingStream {
  capacityBytes = 0;
  blockMetadataType: BlockMetadataType = 'VARIABLE_LENGTH';
  resumes = 0;
  /** Everything before this offset has been received; the next extent must end after it. */
  private cursor = 0;
  private iterator: AsyncIterator<MetadataPage> | undefined;
  private controller: AbortController | undefined;
  private pending: MetadataPage | undefined;
  /** Whether the current stream's first page may overlap what was received before (it was reopened). */
  private reopened = false;
  /**
   * Whether no extent has come yet: the first may start before the caller's starting offset (the spec
   * only says it ends after it), and is then taken as the driver sent it.
   */
  private atStart = true;

  constructor(
    private readonly transport: MetadataTransport,
    private readonly request: (startingOffset: number) => MetadataRequest,
    private readonly what: string,
    private readonly retry: RetryPolicy,
    private readonly onResume: ResumeListener | undefined,
    private readonly signal: AbortSignal | undefined,
  ) {}

  /** Opens the first stream and reads its first page (which tells capacity and style). */
  async start(startingOffset: number): Promise<void> {
    this.cursor = startingOffset;
    const first = await this.nextPage(true);
    if (!first) throw new ProtocolError('PROTOCOL', `${this.what}: the driver ended the stream without a response`, '');
    this.capacityBytes = first.capacityBytes;
    this.blockMetadataType = first.blockMetadataType;
    this.pending = first;
  }

  private finished = false;

  /** The next non-empty batch of extents past the cursor, resuming cut streams; done at the end. */
  async next(): Promise<IteratorResult<Extent[]>> {
    while (!this.finished) {
      let page: MetadataPage | undefined;
      try {
        page = this.pending ?? (await this.nextPage(false));
        this.pending = undefined;
        if (!page) break;
        const batch = this.accept(page);
        if (batch.length > 0) return { done: false, value: batch };
      } catch (err) {
        this.finish();
        throw err;
      }
    }
    this.finish();
    return { done: true, value: undefined };
  }

  /** Stops early: the open stream is cancelled. */
  async return(): Promise<IteratorResult<Extent[]>> {
    this.finish();
    return { done: true, value: undefined };
  }

  private finish(): void {
    this.finished = true;
    this.pending = undefined;
    this.closeController();
  }

  /** Unhooks the caller's signal from the stream being closed (a listing may reopen many times). */
  private unhook: (() => void) | undefined;

  /** The signal of a new stream, aborted when the caller's signal is. */
  private openController(): AbortSignal {
    const controller = new AbortController();
    this.controller = controller;
    const signal = this.signal;
    if (signal) {
      const abort = () => controller.abort(signal.reason);
      signal.addEventListener('abort', abort, { once: true });
      this.unhook = () => signal.removeEventListener('abort', abort);
    }
    return controller.signal;
  }

  /** Cancels the current stream, if any. */
  private closeController(): void {
    this.unhook?.();
    this.unhook = undefined;
    this.controller?.abort();
  }

  /** Checks a page against what came before and returns its extents past the cursor. */
  private accept(page: MetadataPage): Extent[] {
    if (page.capacityBytes !== this.capacityBytes && this.capacityBytes !== 0) {
      throw new ProtocolError(
        'PROTOCOL',
        `${this.what}: the capacity changed from ${this.capacityBytes} to ${page.capacityBytes} bytes mid-listing`,
        '',
      );
    }
    const t = page.tuples;
    const out: Extent[] = [];
    for (let i = 0; i < t.length; i += 2) {
      let offset = t[i]!;
      const length = t[i + 1]!;
      const end = offset + length;
      if (!(length > 0) || offset < 0 || end > this.capacityBytes) {
        throw new ProtocolError(
          'PROTOCOL',
          `${this.what}: the driver sent an extent outside the volume (offset ${offset}, length ${length}, capacity ${this.capacityBytes})`,
          '',
        );
      }
      if (offset < this.cursor) {
        // The first extent of a stream may straddle where it starts: after a reopen keep the new part, at
        // the caller's starting offset the whole extent. Anything else before the cursor is out of order.
        const straddles = i === 0 && (this.reopened || (this.atStart && end > this.cursor));
        if (!straddles) {
          throw new ProtocolError(
            'PROTOCOL',
            `${this.what}: the driver sent extents out of order (offset ${offset} after ${this.cursor})`,
            '',
          );
        }
        if (end <= this.cursor) continue;
        if (this.reopened && !this.atStart) offset = this.cursor;
      }
      out.push({ offset, length: end - offset });
      this.cursor = end;
    }
    if (t.length > 0) {
      this.reopened = false;
      this.atStart = false;
    }
    return out;
  }

  /** The next page, reopening the stream at the cursor as often as the retry policy allows. */
  private async nextPage(first: boolean): Promise<MetadataPage | undefined> {
    let attempt = 0;
    for (;;) {
      this.signal?.throwIfAborted();
      try {
        if (!this.iterator) {
          this.iterator = this.transport.open(this.request(this.cursor), this.openController())[Symbol.asyncIterator]();
        }
        const r = await this.iterator.next();
        if (r.done) return undefined;
        return r.value;
      } catch (err) {
        this.iterator = undefined;
        this.closeController();
        if (this.signal?.aborted) throw this.signal.reason;
        if (!isResumable(err) || ++attempt > this.retry.maxAttempts) throw typedError(err, this.what);
        const delayMs = Math.min(this.retry.maxDelayMs, this.retry.initialDelayMs * 2 ** (attempt - 1));
        this.onResume?.({ offset: this.cursor, attempt, delayMs, error: err });
        await sleep(delayMs, undefined, this.signal ? { signal: this.signal } : {});
        if (!first) this.resumes++;
        this.reopened = true;
      }
    }
  }
}

/** Cuts extents into whole blocks of `blockSize` (aligned; the last may end at the capacity), each once. */
class BlockCutter {
  /** Everything before this offset has been handed out. */
  private done = 0;
  constructor(
    private readonly blockSize: number,
    private readonly capacityBytes: number,
  ) {}

  cut(extents: readonly Extent[]): Extent[] {
    const { blockSize, capacityBytes } = this;
    const out: Extent[] = [];
    for (const e of extents) {
      const start = Math.max(this.done, Math.floor(e.offset / blockSize) * blockSize);
      const end = Math.min(capacityBytes, Math.ceil((e.offset + e.length) / blockSize) * blockSize);
      for (let b = start; b < end; b += blockSize)
        out.push({ offset: b, length: Math.min(blockSize, capacityBytes - b) });
      if (end > this.done) this.done = end;
    }
    return out;
  }
}

/** Cuts extents into whole blocks of `blockSize` (aligned; the last may end at the capacity), each once. */
export async function* rechunk(
  extents: AsyncIterable<Extent>,
  blockSize: number,
  capacityBytes: number,
): AsyncGenerator<Extent> {
  const cutter = new BlockCutter(blockSize, capacityBytes);
  for await (const e of extents) yield* cutter.cut([e]);
}

/**
 * Whether `n` is a power of two (a positive safe integer). Math.log2, not n & (n - 1): bitwise operators
 * work on 32 bits, so 3 × 2^32 would pass.
 */
export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
