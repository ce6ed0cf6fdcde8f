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
    if (
      blockSize !== undefined &&
      (!Number.isSafeInteger(blockSize) || blockSize <= 0 || (blockSize & (blockSize - 1)) !== 0)
    ) {
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
    const extents =
      blockSize === undefined ? stream.extents() : rechunk(stream.extents(), blockSize, stream.capacityBytes);
    let iterated = false;
    return {
      capacityBytes: stream.capacityBytes,
      blockMetadataType: stream.blockMetadataType,
      get resumes() {
        return stream.resumes;
      },
      [Symbol.asyncIterator]() {
        if (iterated) throw new Error(`${what}: a listing can be iterated once`);
        iterated = true;
        return extents[Symbol.asyncIterator]();
      },
    };
  }
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

  /**
   * The extents, one at a time. A hand-written iterator rather than an async generator: it hands out a
   * page's extents with one resolved promise each, which keeps the client above a million extents a second.
   */
  extents(): AsyncIterable<Extent> {
    let buffer: Extent[] = [];
    let at = 0;
    let finished = false;
    const finish = () => {
      finished = true;
      buffer = [];
      this.controller?.abort();
    };
    const iterator: AsyncIterator<Extent> = {
      next: async (): Promise<IteratorResult<Extent>> => {
        while (at >= buffer.length) {
          if (finished) return { done: true, value: undefined };
          let page: MetadataPage | undefined;
          try {
            page = this.pending ?? (await this.nextPage(false));
            this.pending = undefined;
            if (page) buffer = this.accept(page);
          } catch (err) {
            finish();
            throw err;
          }
          at = 0;
          if (!page) {
            finish();
            return { done: true, value: undefined };
          }
        }
        return { done: false, value: buffer[at++]! };
      },
      return: async (): Promise<IteratorResult<Extent>> => {
        finish();
        return { done: true, value: undefined };
      },
    };
    return { [Symbol.asyncIterator]: () => iterator };
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
          this.controller = new AbortController();
          const abort = () => this.controller?.abort(this.signal?.reason);
          this.signal?.addEventListener('abort', abort, { once: true });
          this.iterator = this.transport
            .open(this.request(this.cursor), this.controller.signal)
            [Symbol.asyncIterator]();
        }
        const r = await this.iterator.next();
        if (r.done) return undefined;
        return r.value;
      } catch (err) {
        this.iterator = undefined;
        this.controller?.abort();
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
export async function* rechunk(
  extents: AsyncIterable<Extent>,
  blockSize: number,
  capacityBytes: number,
): AsyncGenerator<Extent> {
  let done = 0;
  for await (const e of extents) {
    const start = Math.max(done, Math.floor(e.offset / blockSize) * blockSize);
    const end = Math.min(capacityBytes, Math.ceil((e.offset + e.length) / blockSize) * blockSize);
    for (let b = start; b < end; b += blockSize) yield { offset: b, length: Math.min(blockSize, capacityBytes - b) };
    if (end > done) done = end;
  }
}
