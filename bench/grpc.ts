/**
 * gRPC suite: what a backup client sees through the wire. The driver runs in a child process (as it does next
 * to a sidecar), serving on a unix socket; this process is the client, on @grpc/grpc-js like the tests. The
 * child also takes a few commands on stdin (block writes through its store), since the driver has no RPC
 * that writes data.
 *
 * Cases (select with --only):
 *   delta-e2e        GetMetadataDelta, 10,000 random changed 4 KiB blocks, 1 TiB vs 1 GiB, VARIABLE and FIXED
 *   stream-rate      a 1,000,000-tuple FIXED stream at the default max_results and at 256
 *   create-snapshot  CreateSnapshot RPC latency on a 1 TiB volume holding 1 GiB
 *   forwarded-delta  multi-node: a FIXED GetMetadataDelta asked of a node that does not own the snapshot (forwarded
 *                    over mutual TLS) against the owner asked directly: tuples/s ratio, added first-message latency
 *
 * BENCH_CPU_PROF=<dir> runs the driver child with --cpu-prof, writing its profile to <dir>.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import type { Readable, Writable } from 'node:stream';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Controller, SnapshotMetadata, VolumeCapability_AccessMode_Mode } from '../src/gen/csi/v1/csi_pb.js';
import type { ExtentStyle } from '../storage-engine/index.js';
import { packageVersion, type DriverConfig, type PeerConfig } from '../src/config.js';
import { parseStaticPeers } from '../src/cluster/peer-directory.js';
import { makePeerCerts, missingOpenssl } from '../test/support/peer-certs.js';
import { freePort } from '../test/support/free-port.js';
import { createLogger } from '../src/logging.js';
import { startDriver } from '../src/server.js';
import { decodeMetadataResponse } from '../src/client/metadata-wire.js';
import { ServiceClient } from '../test/support/csi-client.js';
import {
  distinctSorted,
  GiB,
  KiB,
  median,
  MiB,
  msSince,
  percentile,
  prng,
  randomBuffer,
  round,
  sizeLabel,
  targeted,
  TiB,
  type ParamValue,
  type Result,
  type SuiteContext,
} from './suite.js';

const BLOCK = 4 * KiB;
const SEED = 20261122;
const DRIVER_CHILD_FLAG = '--driver-child';
/** The CLI's --default-max-results default: what max_results 0 gets. */
const DEFAULT_MAX_RESULTS = 4096;

// ---------------------------------------------------------------------------------------------------------------
// The driver child and its command channel.

/** Commands the child runs against its own store (it owns the store; this process only talks to it). */
type Command =
  | { op: 'writeRandom'; volumeId: string; count: number; totalBlocks: number; seed: number }
  | { op: 'writeRange'; volumeId: string; offset: number; length: number }
  | { op: 'flush'; volumeId: string }
  /** store.createSnapshot in the driver's process, timed there: the engine's share of the RPC's latency. */
  | { op: 'snapshotDirect'; volumeId: string; name: string };

interface ChildConfig {
  dir: string;
  socket: string;
  /** Multi-node: this child's node ID and peer settings (forwarded-delta); none for the other cases. */
  nodeId?: string;
  peers?: PeerConfig;
}

class DriverChild {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (value: number) => void; reject: (err: Error) => void }>();
  readonly controller: ServiceClient<typeof Controller>;
  readonly metadata: ServiceClient<typeof SnapshotMetadata>;

  private constructor(
    private readonly child: ChildProcessByStdio<Writable, Readable, Readable>,
    target: string,
    lines: readline.Interface,
  ) {
    this.controller = new ServiceClient(Controller, target);
    this.metadata = new ServiceClient(SnapshotMetadata, target);
    lines.on('line', (line) => {
      const reply = JSON.parse(line) as { id: number; error?: string; value?: number };
      const waiter = this.pending.get(reply.id);
      this.pending.delete(reply.id);
      if (!waiter) return;
      if (reply.error !== undefined) waiter.reject(new Error(`driver child: ${reply.error}`));
      else waiter.resolve(reply.value ?? 0);
    });
  }

  static async start(
    dir: string,
    log: (m: string) => void,
    cluster: Pick<ChildConfig, 'nodeId' | 'peers'> = {},
  ): Promise<DriverChild> {
    const self = fileURLToPath(import.meta.url);
    const root = path.resolve(path.dirname(self), '..');
    const config: ChildConfig = { dir, socket: path.join(dir, 'csi.sock'), ...cluster };
    const profDir = process.env.BENCH_CPU_PROF;
    const nodeArgs = profDir ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(profDir)}`] : [];
    const child = spawn(
      process.execPath,
      [...nodeArgs, '--import', 'tsx', self, DRIVER_CHILD_FLAG, JSON.stringify(config)],
      { cwd: root, stdio: ['pipe', 'pipe', 'pipe'] },
    );
    child.stderr.setEncoding('utf8').on('data', (s: string) => {
      for (const line of s.split('\n')) if (line !== '') log(`driver: ${line}`);
    });
    const lines = readline.createInterface({ input: child.stdout });
    await new Promise<void>((resolve, reject) => {
      const onExit = (code: number | null) => reject(new Error(`driver child exited with ${code} before it was ready`));
      child.once('exit', onExit);
      lines.once('line', (line) => {
        child.off('exit', onExit);
        if ((JSON.parse(line) as { ready?: boolean }).ready) resolve();
        else reject(new Error(`driver child said ${line}`));
      });
    });
    return new DriverChild(child, `unix://${config.socket}`, lines);
  }

  /** Runs a command in the child; resolves with its numeric result (a timing), or 0. */
  run(command: Command): Promise<number> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.child.stdin.write(`${JSON.stringify({ id, ...command })}\n`);
    });
  }

  /** Closing stdin tells the child to drain and stop its driver. */
  async stop(): Promise<void> {
    this.controller.close();
    this.metadata.close();
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.stdin.end();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 30_000);
    await exited;
    clearTimeout(timer);
  }
}

async function driverChildMain(config: ChildConfig): Promise<void> {
  // The parent parses stdout as replies: anything else printed goes to stderr.
  const reply = process.stdout.write.bind(process.stdout);
  process.stdout.write = process.stderr.write.bind(process.stderr) as typeof process.stdout.write;
  const driverConfig: DriverConfig = {
    driverName: 'cbt.csi.dev',
    version: packageVersion(),
    endpoint: { kind: 'unix', path: config.socket },
    stateDir: path.join(config.dir, 'state'),
    nodeId: config.nodeId ?? 'bench-node',
    defaultBlockSize: BLOCK,
    defaultMetadataStyle: 'VARIABLE',
    capacityBytes: undefined,
    defaultMaxResults: DEFAULT_MAX_RESULTS,
    logLevel: 'silent',
    metricsAddress: undefined,
    peers: config.peers,
  };
  const driver = await startDriver(driverConfig, createLogger('silent'));
  const { store } = driver;
  const block = randomBuffer(BLOCK, SEED);
  const chunk = randomBuffer(MiB, SEED + 1);
  const run = async (c: Command): Promise<number | undefined> => {
    switch (c.op) {
      case 'writeRandom': {
        const blocks = distinctSorted(prng(c.seed), c.count, c.totalBlocks);
        for (let i = 0; i < blocks.length; i++) store.write(c.volumeId, blocks[i]! * BLOCK, block);
        return undefined;
      }
      case 'writeRange':
        for (let off = c.offset; off < c.offset + c.length; off += MiB) {
          const n = Math.min(MiB, c.offset + c.length - off);
          store.write(c.volumeId, off, n === MiB ? chunk : chunk.subarray(0, n));
        }
        return undefined;
      case 'flush':
        await store.flush(c.volumeId);
        return undefined;
      case 'snapshotDirect': {
        const volume = store.getVolume(c.volumeId);
        const t0 = performance.now();
        await store.createSnapshot({ volumeId: c.volumeId, name: c.name, attributes: volume.attributes });
        return msSince(t0);
      }
    }
  };
  reply(`${JSON.stringify({ ready: true })}\n`);
  const lines = readline.createInterface({ input: process.stdin });
  // One command at a time, in order: the parent awaits each reply anyway.
  for await (const line of lines) {
    const { id, ...command } = JSON.parse(line) as Command & { id: number };
    try {
      const value = await run(command as Command);
      reply(`${JSON.stringify({ id, value })}\n`);
    } catch (err) {
      reply(`${JSON.stringify({ id, error: err instanceof Error ? err.message : String(err) })}\n`);
    }
  }
  await driver.stop();
}

// ---------------------------------------------------------------------------------------------------------------
// Client-side helpers.

async function createVolume(d: DriverChild, name: string, capacityBytes: number, style: ExtentStyle): Promise<string> {
  const res = await d.controller.call('createVolume', {
    name,
    capacityRange: { requiredBytes: BigInt(capacityBytes) },
    volumeCapabilities: [
      {
        accessType: { case: 'block', value: {} },
        accessMode: { mode: VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER },
      },
    ],
    parameters: { metadataStyle: style, blockSize: String(BLOCK) },
  });
  return res.volume!.volumeId;
}

async function createSnapshot(d: DriverChild, sourceVolumeId: string, name: string): Promise<string> {
  const res = await d.controller.call('createSnapshot', { sourceVolumeId, name });
  return res.snapshot!.snapshotId;
}

interface Streamed {
  /** From the call to the first message. */
  firstMessageMs: number;
  /** From the call to the last message, and to the status. */
  lastMessageMs: number;
  statusMs: number;
  messages: number;
  tuples: number;
  bytes: number;
  allFixedSize: boolean;
}

/** Reads a GetMetadataDelta stream the way a client would: 'data' events, every tuple touched once. */
function streamDelta(
  client: ServiceClient<typeof SnapshotMetadata>,
  base: string,
  target: string,
  maxResults: number,
): Promise<Streamed> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let first = Number.NaN;
    let last = t0;
    let messages = 0;
    let tuples = 0;
    let bytes = 0;
    let allFixedSize = true;
    // A backup client decodes tuples straight off the wire; building a message object per tuple would
    // make this client, not the driver, the thing measured.
    const call = client.streamRaw(
      'getMetadataDelta',
      { baseSnapshotId: base, targetSnapshotId: target, maxResults },
      { deadlineMs: 600_000 },
    );
    call.on('data', (raw: Buffer) => {
      last = performance.now();
      if (messages === 0) first = last - t0;
      messages++;
      const { tuples: list } = decodeMetadataResponse(raw);
      tuples += list.length / 2;
      for (let i = 1; i < list.length; i += 2) {
        const size = list[i]!;
        bytes += size;
        if (size !== BLOCK) allFixedSize = false;
      }
    });
    call.on('error', reject);
    call.on('end', () =>
      resolve({
        firstMessageMs: first,
        lastMessageMs: last - t0,
        statusMs: msSince(t0),
        messages,
        tuples,
        bytes,
        allFixedSize,
      }),
    );
  });
}

// ---------------------------------------------------------------------------------------------------------------
// 1. GetMetadataDelta end to end: its cost must follow the change set, not the volume size.

async function deltaE2e(ctx: SuiteContext, d: DriverChild): Promise<void> {
  const changed = ctx.quick ? 200 : 10_000;
  const reps = ctx.quick ? 3 : 9;
  const large = ctx.quick ? 64 * GiB : TiB;
  const small = ctx.quick ? 64 * MiB : GiB;
  const styles: ExtentStyle[] = ['VARIABLE', 'FIXED'];
  const medians = new Map<string, number>();

  for (const capacityBytes of [large, small]) {
    const capacity = sizeLabel(capacityBytes);
    const totalBlocks = capacityBytes / BLOCK;
    const seed = SEED + 10;
    // Runs of adjacent blocks in the random set: what VARIABLE must return, counted independently.
    const blocks = distinctSorted(prng(seed), changed, totalBlocks);
    let runs = 0;
    for (let i = 0; i < blocks.length; i++) if (i === 0 || blocks[i]! !== blocks[i - 1]! + 1) runs++;

    for (const style of styles) {
      const name = `e2e-${capacity}-${style.toLowerCase()}`;
      const volumeId = await createVolume(d, name, capacityBytes, style);
      const base = await createSnapshot(d, volumeId, `${name}-base`);
      await d.run({ op: 'writeRandom', volumeId, count: changed, totalBlocks, seed });
      const target = await createSnapshot(d, volumeId, `${name}-target`);

      const first = await streamDelta(d.metadata, base, target, 0); // warm-up, and the check of what is timed
      const expectedTuples = style === 'FIXED' ? changed : runs;
      const verified = first.tuples === expectedTuples && first.bytes === changed * BLOCK;
      if (!verified) {
        ctx.log(
          `WARNING delta-e2e ${style} ${capacity}: ${first.tuples} tuples / ${first.bytes} bytes, expected ${expectedTuples} / ${changed * BLOCK}`,
        );
      }
      const samples: number[] = [];
      const statusSamples: number[] = [];
      for (let r = 0; r < reps; r++) {
        const s = await streamDelta(d.metadata, base, target, 0);
        samples.push(s.lastMessageMs);
        statusSamples.push(s.statusMs);
      }
      const ms = median(samples);
      medians.set(`${style}/${capacityBytes}`, ms);
      const result: Result = {
        metric: 'get_metadata_delta_e2e_ms',
        value: round(ms),
        unit: 'ms',
        params: {
          capacity,
          capacityBytes,
          blockSize: BLOCK,
          changedBlocks: changed,
          placement: 'random',
          style,
          tuples: first.tuples,
          messages: first.messages,
          maxResults: `0 (driver default ${DEFAULT_MAX_RESULTS})`,
          timed: 'call to last message, grpc-js client, driver in a child process, unix socket',
          verified,
          stat: `median of ${reps}`,
          minMs: round(Math.min(...samples)),
          maxMs: round(Math.max(...samples)),
          medianToStatusMs: round(median(statusSamples)),
          quick: ctx.quick,
        },
      };
      ctx.emit(capacityBytes === large ? targeted(result, '< 100 ms', ms < 100) : result);
    }
  }

  for (const style of styles) {
    const ratio = medians.get(`${style}/${large}`)! / medians.get(`${style}/${small}`)!;
    ctx.emit(
      targeted(
        {
          metric: 'get_metadata_delta_capacity_ratio',
          value: round(ratio),
          unit: 'x',
          params: {
            numerator: sizeLabel(large),
            denominator: sizeLabel(small),
            style,
            changedBlocks: changed,
            quick: ctx.quick,
          },
        },
        '<= 2',
        ratio <= 2,
      ),
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Tuples per second of a long FIXED stream.

async function streamRate(ctx: SuiteContext, d: DriverChild): Promise<void> {
  const changed = ctx.quick ? 20_000 : 1_000_000;
  const reps = ctx.quick ? 2 : 3;
  const capacityBytes = ctx.quick ? 256 * MiB : 16 * GiB;
  const volumeId = await createVolume(d, 'stream-rate', capacityBytes, 'FIXED');
  const base = await createSnapshot(d, volumeId, 'stream-rate-base');
  const t0 = performance.now();
  // Contiguous 1 MiB writes: the fastest way to change a million blocks; FIXED lists each block anyway.
  await d.run({ op: 'writeRange', volumeId, offset: 0, length: changed * BLOCK });
  const target = await createSnapshot(d, volumeId, 'stream-rate-target');
  ctx.log(`stream-rate setup: ${changed} blocks written and snapshotted in ${(msSince(t0) / 1000).toFixed(1)} s`);

  const settings: Array<{ maxResults: number; target: number }> = [
    { maxResults: 0, target: 1_000_000 },
    { maxResults: 256, target: 500_000 },
  ];
  for (const setting of settings) {
    const first = await streamDelta(d.metadata, base, target, setting.maxResults);
    const verified = first.tuples === changed && first.bytes === changed * BLOCK && first.allFixedSize;
    if (!verified)
      ctx.log(`WARNING stream-rate max_results ${setting.maxResults}: ${first.tuples} tuples / ${first.bytes} bytes`);
    const rates: number[] = [];
    const times: number[] = [];
    for (let r = 0; r < reps; r++) {
      const s = await streamDelta(d.metadata, base, target, setting.maxResults);
      times.push(s.lastMessageMs);
      rates.push(s.tuples / (s.lastMessageMs / 1000));
    }
    const rate = median(rates);
    ctx.emit(
      targeted(
        {
          metric: 'get_metadata_delta_tuples_per_s',
          value: Math.round(rate),
          unit: 'tuples/s',
          params: {
            style: 'FIXED',
            changedBlocks: changed,
            capacity: sizeLabel(capacityBytes),
            blockSize: BLOCK,
            maxResults: setting.maxResults === 0 ? `0 (driver default ${DEFAULT_MAX_RESULTS})` : setting.maxResults,
            tuplesPerMessage: Math.round(first.tuples / first.messages),
            messages: first.messages,
            // Seen: a 16 MiB window (grpc-node.flow_control_window) streamed no faster; the driver's CPU is the limit.
            clientWindow: '64KiB (grpc-js default)',
            consumer: "grpc-js 'data' events, tuples decoded off the wire, every tuple touched",
            verified,
            stat: `median of ${reps}`,
            medianMs: round(median(times)),
            quick: ctx.quick,
          },
        },
        `>= ${setting.target} tuples/s`,
        rate >= setting.target,
      ),
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. CreateSnapshot through the RPC, on a big volume with real data in it.

async function createSnapshotLatency(ctx: SuiteContext, d: DriverChild): Promise<void> {
  const capacityBytes = ctx.quick ? 64 * GiB : TiB;
  const prefill = ctx.quick ? 16 * MiB : GiB;
  const snapshots = ctx.quick ? 5 : 50;
  const writesBetween = 16;
  const volumeId = await createVolume(d, 'snap-latency', capacityBytes, 'VARIABLE');
  await d.run({ op: 'writeRange', volumeId, offset: 0, length: prefill });
  await d.run({ op: 'flush', volumeId });
  const samples: number[] = [];
  const engineSamples: number[] = [];
  const noopSamples: number[] = [];
  for (let i = 0; i < snapshots; i++) {
    await d.run({
      op: 'writeRandom',
      volumeId,
      count: writesBetween,
      totalBlocks: capacityBytes / BLOCK,
      seed: SEED + 100 + i,
    });
    const t0 = performance.now();
    await createSnapshot(d, volumeId, `lat-${i}`);
    samples.push(msSince(t0));
    // The same work without gRPC, and gRPC without the work: where the RPC's time goes.
    await d.run({
      op: 'writeRandom',
      volumeId,
      count: writesBetween,
      totalBlocks: capacityBytes / BLOCK,
      seed: SEED + 200 + i,
    });
    engineSamples.push(await d.run({ op: 'snapshotDirect', volumeId, name: `lat-direct-${i}` }));
    const t1 = performance.now();
    await d.controller.call('controllerGetCapabilities', {});
    noopSamples.push(msSince(t1));
  }
  const p50 = percentile(samples, 50);
  const params: Record<string, ParamValue> = {
    capacity: sizeLabel(capacityBytes),
    prefilled: sizeLabel(prefill),
    prefillWrite: '1MiB sequential, flushed before timing',
    snapshots,
    randomBlockWritesBeforeEach: writesBetween,
    blockSize: BLOCK,
    timed: 'CreateSnapshot RPC round trip (includes flushing the 16 new blocks)',
    minMs: round(Math.min(...samples)),
    maxMs: round(Math.max(...samples)),
    quick: ctx.quick,
  };
  ctx.emit(
    targeted({ metric: 'create_snapshot_rpc_p50_ms', value: round(p50), unit: 'ms', params }, '< 20 ms', p50 < 20),
  );
  ctx.emit({ metric: 'create_snapshot_rpc_p99_ms', value: round(percentile(samples, 99)), unit: 'ms', params });
  const context = {
    ...params,
    timed: 'store.createSnapshot inside the driver process, same writes before each',
    minMs: round(Math.min(...engineSamples)),
    maxMs: round(Math.max(...engineSamples)),
  };
  ctx.emit({
    metric: 'create_snapshot_engine_p50_ms',
    value: round(percentile(engineSamples, 50)),
    unit: 'ms',
    params: context,
  });
  ctx.emit({
    metric: 'unary_rpc_roundtrip_p50_ms',
    value: round(percentile(noopSamples, 50)),
    unit: 'ms',
    params: { rpc: 'ControllerGetCapabilities', samples: noopSamples.length, quick: ctx.quick },
  });
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Multi-node: a delta forwarded by a node that does not own the snapshot, against the owner asked directly.

async function forwardedDelta(ctx: SuiteContext, _single: DriverChild): Promise<void> {
  const changed = ctx.quick ? 20_000 : 500_000;
  const reps = ctx.quick ? 3 : 7;
  const capacityBytes = ctx.quick ? 256 * MiB : 4 * GiB;
  const missing = missingOpenssl();
  if (missing) throw new Error(`forwarded-delta needs test certificates: ${missing}`);
  const certs = makePeerCerts(path.join(ctx.dir, 'peer-certs')).valid;
  const [ownerPort, forwarderPort] = [await freePort(), await freePort()];
  const peers = `owner=127.0.0.1:${ownerPort},forwarder=127.0.0.1:${forwarderPort}`;
  const peerConfig = (port: number): PeerConfig => ({
    listen: { host: '127.0.0.1', port },
    tls: certs,
    discovery: { kind: 'static', peers: Object.fromEntries(parseStaticPeers(peers)) },
  });
  const childDir = (name: string) => {
    const d = path.join(ctx.dir, name);
    fs.mkdirSync(d, { recursive: true });
    return d;
  };
  const owner = await DriverChild.start(childDir('owner'), ctx.log, { nodeId: 'owner', peers: peerConfig(ownerPort) });
  const forwarder = await DriverChild.start(childDir('forwarder'), ctx.log, {
    nodeId: 'forwarder',
    peers: peerConfig(forwarderPort),
  });
  try {
    const volumeId = await createVolume(owner, 'forwarded', capacityBytes, 'FIXED');
    const base = await createSnapshot(owner, volumeId, 'forwarded-base');
    const t0 = performance.now();
    await owner.run({ op: 'writeRange', volumeId: volumeId.split('@')[0]!, offset: 0, length: changed * BLOCK });
    const target = await createSnapshot(owner, volumeId, 'forwarded-target');
    ctx.log(`forwarded-delta setup: ${changed} blocks written and snapshotted in ${(msSince(t0) / 1000).toFixed(1)} s`);

    const ways = { direct: owner, forwarded: forwarder } as const;
    const samples = { direct: [] as Streamed[], forwarded: [] as Streamed[] };
    for (const [way, d] of Object.entries(ways)) {
      const first = await streamDelta(d.metadata, base, target, 0); // warm-up (connections, JIT) and the check
      const verified = first.tuples === changed && first.bytes === changed * BLOCK && first.allFixedSize;
      if (!verified) ctx.log(`WARNING forwarded-delta ${way}: ${first.tuples} tuples / ${first.bytes} bytes`);
    }
    // Alternate the two ways, so a change in the machine's load falls on both alike.
    for (let r = 0; r < reps; r++) {
      for (const way of ['direct', 'forwarded'] as const)
        samples[way].push(await streamDelta(ways[way].metadata, base, target, 0));
    }
    const rate = (s: Streamed) => s.tuples / (s.lastMessageMs / 1000);
    const directRate = median(samples.direct.map(rate));
    const forwardedRate = median(samples.forwarded.map(rate));
    const params: Record<string, ParamValue> = {
      style: 'FIXED',
      changedBlocks: changed,
      capacity: sizeLabel(capacityBytes),
      blockSize: BLOCK,
      maxResults: `0 (driver default ${DEFAULT_MAX_RESULTS})`,
      path: 'grpc-js client -> forwarder unix socket -> mutual TLS on loopback -> owner; each driver in its own child process',
      directTuplesPerS: Math.round(directRate),
      forwardedTuplesPerS: Math.round(forwardedRate),
      stat: `median of ${reps}, alternating direct and forwarded`,
      cpus: os.cpus().length,
      quick: ctx.quick,
    };
    const ratio = forwardedRate / directRate;
    ctx.emit(
      targeted(
        { metric: 'forwarded_delta_rate_ratio', value: round(ratio), unit: 'x', params },
        '>= 0.5',
        ratio >= 0.5,
      ),
    );

    // First-message latency: a one-message delta (16 changed blocks), many times, alternating the two ways.
    const small = await createVolume(owner, 'forwarded-first', 64 * MiB, 'FIXED');
    const smallBase = await createSnapshot(owner, small, 'forwarded-first-base');
    await owner.run({ op: 'writeRange', volumeId: small.split('@')[0]!, offset: 0, length: 16 * BLOCK });
    const smallTarget = await createSnapshot(owner, small, 'forwarded-first-target');
    const firstReps = ctx.quick ? 20 : 100;
    const firsts = { direct: [] as number[], forwarded: [] as number[] };
    for (let r = 0; r < firstReps; r++) {
      for (const way of ['direct', 'forwarded'] as const) {
        firsts[way].push((await streamDelta(ways[way].metadata, smallBase, smallTarget, 0)).firstMessageMs);
      }
    }
    const added = median(firsts.forwarded) - median(firsts.direct);
    ctx.emit(
      targeted(
        {
          metric: 'forwarded_delta_added_first_message_ms',
          value: round(added),
          unit: 'ms',
          params: {
            path: params.path!,
            tuples: 16,
            stat: `difference of medians of ${firstReps}, alternating direct and forwarded`,
            firstMessageDirectP50Ms: round(median(firsts.direct)),
            firstMessageForwardedP50Ms: round(median(firsts.forwarded)),
            // Low percentiles show the hop's own cost; the medians also carry the machine's scheduling delays
            // (three processes wake up per forwarded message instead of two).
            firstMessageDirectP10Ms: round(percentile(firsts.direct, 10)),
            firstMessageForwardedP10Ms: round(percentile(firsts.forwarded, 10)),
            addedAtP10Ms: round(percentile(firsts.forwarded, 10) - percentile(firsts.direct, 10)),
            cpus: os.cpus().length,
            quick: ctx.quick,
          },
        },
        '< 5 ms',
        added < 5,
      ),
    );
  } finally {
    await forwarder.stop();
    await owner.stop();
  }
}

// ---------------------------------------------------------------------------------------------------------------

const CASES: ReadonlyArray<readonly [string, (ctx: SuiteContext, d: DriverChild) => Promise<void>]> = [
  ['delta-e2e', deltaE2e],
  ['stream-rate', streamRate],
  ['create-snapshot', createSnapshotLatency],
  ['forwarded-delta', forwardedDelta],
];

/** Runs every selected case against one driver child; a failing case does not stop the others. */
export async function run(ctx: SuiteContext): Promise<void> {
  const selected = CASES.filter(([name]) => ctx.only === undefined || ctx.only.has(name));
  if (selected.length === 0) {
    ctx.log(`no case selected; cases are: ${CASES.map(([n]) => n).join(', ')}`);
    return;
  }
  const driver = await DriverChild.start(ctx.dir, ctx.log);
  const failures: string[] = [];
  try {
    for (const [name, fn] of selected) {
      ctx.log(`case ${name}`);
      const t0 = performance.now();
      try {
        await fn(ctx, driver);
        ctx.log(`case ${name} done in ${(msSince(t0) / 1000).toFixed(1)} s`);
      } catch (err) {
        failures.push(name);
        ctx.log(`case ${name} FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
      }
    }
  } finally {
    await driver.stop();
  }
  if (failures.length > 0) throw new Error(`grpc cases failed: ${failures.join(', ')}`);
}

const invokedAs = process.argv[1] === undefined ? '' : pathToFileURL(path.resolve(process.argv[1])).href;
if (process.argv[2] === DRIVER_CHILD_FLAG && invokedAs === import.meta.url) {
  driverChildMain(JSON.parse(process.argv[3] ?? '{}') as ChildConfig).then(
    () => process.exit(0),
    (err: unknown) => {
      process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(1);
    },
  );
}
