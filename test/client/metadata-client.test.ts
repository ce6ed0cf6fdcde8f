/**
 * The client's contract, independent of the transport: one strictly ordered, non-overlapping sequence of
 * extents however often the stream is cut; cut streams resumed at the end of the last extent received,
 * with a bounded exponential backoff; codes a retry cannot fix surfaced at once as typed errors; blockSize
 * re-chunking. The transport here is scripted so each stream can be cut exactly where a test says; the
 * same behaviour against a real driver that is killed and restarted is in csi-direct.test.ts.
 */
import { getEventListeners } from 'node:events';
import { Code, ConnectError } from '@connectrpc/connect';
import { describe, expect, it } from 'vitest';
import {
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ProtocolError,
  RetriesExhaustedError,
  SnapshotMetadataClient,
  UnauthenticatedError,
  type Extent,
  type ExtentListing,
  type MetadataPage,
  type MetadataRequest,
  type MetadataTransport,
} from '../../src/client/index.js';

const CAPACITY = 1 << 20;

/** A driver's whole answer as pages, served from any starting offset, cut where `cuts` says. */
class ScriptedTransport implements MetadataTransport {
  readonly opened: number[] = [];
  constructor(
    private readonly all: Extent[],
    /** For the n-th open: after how many pages to fail, and with which code (undefined: no failure). */
    private readonly cuts: ({ after: number; code: Code; message?: string } | undefined)[] = [],
    private readonly perPage = 3,
    private readonly type: MetadataPage['blockMetadataType'] = 'VARIABLE_LENGTH',
  ) {}
  async *open(request: MetadataRequest, _signal?: AbortSignal): AsyncIterable<MetadataPage> {
    const n = this.opened.push(request.startingOffset) - 1;
    const cut = this.cuts[n];
    if (cut && cut.after === 0) throw new ConnectError(cut.message ?? 'cut', cut.code);
    // As the driver does: the first extent is the one that ends after the starting offset.
    const rest = this.all.filter((e) => e.offset + e.length > request.startingOffset);
    let pages = 0;
    for (let i = 0; i < rest.length || i === 0; i += this.perPage) {
      const slice = rest.slice(i, i + this.perPage);
      yield {
        blockMetadataType: this.type,
        capacityBytes: CAPACITY,
        tuples: slice.flatMap((e) => [e.offset, e.length]),
      };
      if (cut && ++pages === cut.after) throw new ConnectError(cut.message ?? 'stream cut', cut.code);
    }
  }
  close() {}
}

const fast = { retry: { initialDelayMs: 1, maxDelayMs: 4, maxAttempts: 3 } };

async function collect(listing: AsyncIterable<Extent>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of listing) out.push(e);
  return out;
}

/** Twenty 8 KiB extents, 4 KiB apart. */
const EXTENTS: Extent[] = Array.from({ length: 20 }, (_, i) => ({ offset: i * 12288, length: 8192 }));

describe('SnapshotMetadataClient', () => {
  it('resumes a stream cut by UNAVAILABLE, CANCELLED or DEADLINE_EXCEEDED at the end of the last extent received; the caller sees the uncut sequence', async () => {
    for (const code of [Code.Unavailable, Code.Canceled, Code.DeadlineExceeded]) {
      const transport = new ScriptedTransport(EXTENTS, [
        { after: 2, code },
        { after: 1, code },
      ]);
      const listing = await new SnapshotMetadataClient(transport, fast).allocated('snap');
      expect(await collect(listing)).toEqual(EXTENTS);
      // 2 pages of 3, then 1 page of 3: resumed at the end of extent 6, then of extent 9.
      expect(transport.opened).toEqual([0, EXTENTS[5]!.offset + 8192, EXTENTS[8]!.offset + 8192]);
      expect(listing.resumes).toBe(2);
    }
  });

  it('keeps only the new part of an extent the resumed stream repeats (no overlap, no gap)', async () => {
    // A VARIABLE driver may merge differently after a restart: the resumed stream's first extent straddles.
    class Straddling extends ScriptedTransport {
      override async *open(request: MetadataRequest): AsyncIterable<MetadataPage> {
        if (request.startingOffset === 0) {
          yield { blockMetadataType: 'VARIABLE_LENGTH', capacityBytes: CAPACITY, tuples: [0, 4096, 8192, 4096] };
          throw new ConnectError('cut', Code.Unavailable);
        }
        this.opened.push(request.startingOffset);
        yield { blockMetadataType: 'VARIABLE_LENGTH', capacityBytes: CAPACITY, tuples: [8192, 16384, 65536, 4096] };
      }
    }
    const transport = new Straddling([]);
    const got = await collect(await new SnapshotMetadataClient(transport, fast).allocated('snap'));
    expect(got).toEqual([
      { offset: 0, length: 4096 },
      { offset: 8192, length: 4096 },
      { offset: 12288, length: 12288 },
      { offset: 65536, length: 4096 },
    ]);
    expect(transport.opened).toEqual([12288]);
  });

  it('from a starting offset inside an extent, takes the extent that ends after it as the driver sends it (the spec allows it to start before), and resumes from there', async () => {
    const start = EXTENTS[2]!.offset + 100;
    const transport = new ScriptedTransport(EXTENTS, [{ after: 1, code: Code.Unavailable }]);
    const listing = await new SnapshotMetadataClient(transport, fast).allocated('snap', { startingOffset: start });
    expect(await collect(listing)).toEqual(EXTENTS.slice(2));
    expect(transport.opened).toEqual([start, EXTENTS[4]!.offset + 8192]);
    // The same when the first stream is cut before its first message.
    const cutAtOnce = new ScriptedTransport(EXTENTS, [{ after: 0, code: Code.Unavailable }]);
    const again = await new SnapshotMetadataClient(cutAtOnce, fast).allocated('snap', { startingOffset: start });
    expect(await collect(again)).toEqual(EXTENTS.slice(2));
  });

  it('gives up after maxAttempts reopens without progress, as RetriesExhaustedError, with doubling delays', async () => {
    const delays: number[] = [];
    const transport = new ScriptedTransport(EXTENTS, Array(10).fill({ after: 0, code: Code.Unavailable }));
    const client = new SnapshotMetadataClient(transport, {
      retry: { initialDelayMs: 1, maxDelayMs: 4, maxAttempts: 4 },
      onResume: (r) => delays.push(r.delayMs),
    });
    await expect(client.allocated('snap')).rejects.toBeInstanceOf(RetriesExhaustedError);
    expect(transport.opened.length).toBe(5);
    expect(delays).toEqual([1, 2, 4, 4]);
  });

  it('does not retry INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, FAILED_PRECONDITION: typed errors that say what to do', async () => {
    const cases: [Code, new (...a: never[]) => Error, RegExp][] = [
      [Code.InvalidArgument, InvalidArgumentError, /same volume/],
      [Code.NotFound, NotFoundError, /does not exist/],
      [Code.PermissionDenied, PermissionDeniedError, /backup-client role/],
      [Code.Unauthenticated, UnauthenticatedError, /fresh token/],
      [Code.FailedPrecondition, FailedPreconditionError, /take a full backup/],
    ];
    for (const [code, type, advice] of cases) {
      const transport = new ScriptedTransport(EXTENTS, [{ after: 0, code }]);
      const err = await new SnapshotMetadataClient(transport, fast).delta('a', 'b').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(type);
      expect((err as Error).message).toMatch(advice);
      expect(transport.opened.length, `${Code[code]} is not retried`).toBe(1);
    }
    // Mid-stream too: the extents before the failure were delivered, then the typed error.
    const transport = new ScriptedTransport(EXTENTS, [{ after: 1, code: Code.FailedPrecondition }]);
    const listing = await new SnapshotMetadataClient(transport, fast).delta('a', 'b');
    const seen: Extent[] = [];
    await expect(
      (async () => {
        for await (const e of listing) seen.push(e);
      })(),
    ).rejects.toBeInstanceOf(FailedPreconditionError);
    expect(seen).toEqual(EXTENTS.slice(0, 3));
  });

  it('FAILED_PRECONDITION: the advice to take a full backup is given once, whether or not the driver gave it', async () => {
    for (const message of [
      'the change record is gone',
      'changed block tracking is not available: take a full backup',
    ]) {
      const transport = new ScriptedTransport(EXTENTS, [{ after: 0, code: Code.FailedPrecondition, message }]);
      const err = await new SnapshotMetadataClient(transport, fast).delta('a', 'b').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(FailedPreconditionError);
      expect((err as Error).message).toContain(message);
      expect((err as Error).message.match(/take a full backup/gi), message).toHaveLength(1);
    }
  });

  it('stops at once when the caller aborts, without retrying', async () => {
    const controller = new AbortController();
    const transport = new ScriptedTransport(EXTENTS, [], 1);
    const listing = await new SnapshotMetadataClient(transport, fast).allocated('snap', { signal: controller.signal });
    const seen: Extent[] = [];
    const run = (async () => {
      for await (const e of listing) {
        seen.push(e);
        if (seen.length === 2) controller.abort(new Error('user stop'));
      }
    })();
    await expect(run).rejects.toThrow(/user stop/);
    expect(seen.length).toBeLessThanOrEqual(3);
    expect(transport.opened.length).toBe(1);
  });

  it('refuses a driver answer out of order or outside the volume (ProtocolError)', async () => {
    const backwards = new ScriptedTransport([
      { offset: 8192, length: 4096 },
      { offset: 0, length: 4096 },
    ]);
    const listing = await new SnapshotMetadataClient(backwards, fast).allocated('snap');
    await expect(collect(listing)).rejects.toBeInstanceOf(ProtocolError);
    const outside = new ScriptedTransport([{ offset: CAPACITY - 4096, length: 8192 }]);
    await expect(collect(await new SnapshotMetadataClient(outside, fast).allocated('snap'))).rejects.toBeInstanceOf(
      ProtocolError,
    );
  });

  it("re-chunks FIXED and VARIABLE answers into whole aligned blocks of the caller's size, each once", async () => {
    const variable = new ScriptedTransport([
      { offset: 4096, length: 4096 },
      { offset: 12288, length: 20480 }, // 12 KiB .. 32 KiB: blocks 0 (again) and 1 of 16 KiB
      { offset: 65536 + 512, length: 512 },
    ]);
    const got = await collect(await new SnapshotMetadataClient(variable, fast).allocated('snap', { blockSize: 16384 }));
    expect(got).toEqual([
      { offset: 0, length: 16384 },
      { offset: 16384, length: 16384 },
      { offset: 65536, length: 16384 },
    ]);
    const fixed = new ScriptedTransport(
      Array.from({ length: 8 }, (_, i) => ({ offset: 65536 + i * 4096, length: 4096 })),
      [],
      3,
      'FIXED_LENGTH',
    );
    const listing = await new SnapshotMetadataClient(fixed, fast).allocated('snap', { blockSize: 1024 });
    expect(listing.blockMetadataType).toBe('FIXED_LENGTH');
    const small = await collect(listing);
    expect(small.length).toBe(32);
    expect(small.every((e, i) => e.offset === 65536 + i * 1024 && e.length === 1024)).toBe(true);
  });

  it('batches() gives the same extents as one-by-one iteration, resumed and re-chunked alike; a listing iterates once', async () => {
    const cuts = [
      { after: 2, code: Code.Unavailable },
      { after: 1, code: Code.Canceled },
    ];
    const flat = async (listing: ExtentListing) => {
      const out: Extent[] = [];
      for await (const batch of listing.batches()) {
        expect(batch.length).toBeGreaterThan(0);
        out.push(...batch);
      }
      return out;
    };
    const client = (t: MetadataTransport) => new SnapshotMetadataClient(t, fast);
    expect(await flat(await client(new ScriptedTransport(EXTENTS, cuts)).allocated('snap'))).toEqual(
      await collect(await client(new ScriptedTransport(EXTENTS, cuts)).allocated('snap')),
    );
    expect(
      await flat(await client(new ScriptedTransport(EXTENTS, cuts)).allocated('snap', { blockSize: 16384 })),
    ).toEqual(
      await collect(await client(new ScriptedTransport(EXTENTS, cuts)).allocated('snap', { blockSize: 16384 })),
    );
    const listing = await client(new ScriptedTransport(EXTENTS)).allocated('snap');
    await flat(listing);
    expect(() => listing[Symbol.asyncIterator]()).toThrow(/iterated once/);
    expect(() => listing.batches()).toThrow(/iterated once/);
  });

  it("a long listing resumed many times holds no listener on the caller's AbortSignal once each stream is done with", async () => {
    // 19 cuts, a page each: a listener left per reopened stream would pile up (and warn past 10).
    const cuts = Array.from({ length: 19 }, () => ({ after: 1, code: Code.Unavailable }));
    const signal = new AbortController().signal;
    const listing = await new SnapshotMetadataClient(new ScriptedTransport(EXTENTS, cuts, 1), fast).allocated('snap', {
      signal,
    });
    const got: Extent[] = [];
    for await (const e of listing) {
      got.push(e);
      expect(getEventListeners(signal, 'abort').length).toBeLessThanOrEqual(1);
    }
    expect(got).toEqual(EXTENTS);
    expect(listing.resumes).toBe(19);
    expect(getEventListeners(signal, 'abort')).toHaveLength(0);
  });

  it('an early break from for await closes the stream', async () => {
    let aborted = false;
    class Watching extends ScriptedTransport {
      override async *open(request: MetadataRequest, signal?: AbortSignal): AsyncIterable<MetadataPage> {
        signal?.addEventListener('abort', () => {
          aborted = true;
        });
        yield* super.open(request);
      }
    }
    const listing = await new SnapshotMetadataClient(new Watching(EXTENTS), fast).allocated('snap');
    for await (const _ of listing) break;
    expect(aborted).toBe(true);
  });
});
