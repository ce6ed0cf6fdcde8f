/**
 * A full state disk is recoverable through CSI (spec: "Not enough space to create snapshot" and a lack of
 * capacity are RESOURCE_EXHAUSTED; DeleteVolume and DeleteSnapshot have no out-of-space row, so they must
 * succeed). Runs the real driver over its unix socket with its state directory on a small ext4 filesystem
 * that the test fills through the engine; needs root and loop devices (skipped without them, failing under CI=true).
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { status } from '@grpc/grpc-js';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { DriverConfig } from '../../src/config.js';
import { Controller, VolumeCapability_AccessMode_Mode as Mode } from '../../src/gen/csi/v1/csi_pb.js';
import { createLogger } from '../../src/logging.js';
import { startDriver, type RunningDriver } from '../../src/server.js';
import { ServiceClient, type RpcError } from '../support/csi-client.js';
import { MiB, exhaustCatalog, fillUntilFull, fingerprint, writeChunks } from '../support/fill-store.js';
import { missingSmallFileSystem, mountSmallExt4, type SmallFileSystem } from '../support/small-filesystem.js';
import { testConfig } from '../support/test-driver.js';

const missing = missingSmallFileSystem();
const mustRun = process.env.CI === 'true';
const VOLUME = 256 * MiB;
const SPAN = 32 * MiB;
const capability = { accessType: { case: 'block' as const, value: {} }, accessMode: { mode: Mode.SINGLE_NODE_WRITER } };

interface Running {
  driver: RunningDriver;
  controller: ServiceClient<typeof Controller>;
  logs: string[];
  stop(): Promise<void>;
}

async function start(config: DriverConfig): Promise<Running> {
  const logs: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      logs.push(...chunk.toString().split('\n').filter(Boolean));
      done();
    },
  });
  const driver = await startDriver(config, createLogger('info', sink));
  const controller = new ServiceClient(
    Controller,
    `unix://${driver.endpoint.kind === 'unix' ? driver.endpoint.path : ''}`,
  );
  return {
    driver,
    controller,
    logs,
    async stop() {
      controller.close();
      await driver.stop();
    },
  };
}

function metrics(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
}

function counter(text: string, series: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.slice(series.length + 1)) : 0;
}

async function until(what: string, done: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await done())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function failure(call: Promise<unknown>): Promise<RpcError | undefined> {
  try {
    await call;
    return undefined;
  } catch (err) {
    return err as RpcError;
  }
}

const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  // Every step runs even if one fails (a driver that cannot stop must not leave the filesystem mounted).
  const errors: unknown[] = [];
  for (const fn of cleanup.splice(0).reverse())
    await Promise.resolve()
      .then(fn)
      .catch((err: unknown) => errors.push(err));
  if (errors.length > 0) throw errors[0];
});

describe.skipIf(missing !== undefined && !mustRun)(`full state disk${missing ? ` (skipped: ${missing})` : ''}`, () => {
  beforeAll(() => {
    if (missing) throw new Error(`CI=true but the full-disk tests cannot run: ${missing}`);
  });

  it('creates answer RESOURCE_EXHAUSTED, deletes succeed and free space, failed compaction is logged, counted and retried, nothing stored changes', async () => {
    const small: SmallFileSystem = mountSmallExt4({ sizeBytes: 64 * 1024 * 1024 });
    cleanup.push(() => small.remove());
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-full-'));
    cleanup.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const config = testConfig(dir, { stateDir: path.join(small.dir, 'state'), metricsAddress: '127.0.0.1:0' });
    let run = await start(config);
    cleanup.push(() => run.stop());
    const { controller } = run;
    const store = () => run.driver.store;
    const createVolume = (name: string) =>
      controller.call('createVolume', {
        name,
        capacityRange: { requiredBytes: BigInt(VOLUME) },
        volumeCapabilities: [capability],
      });

    // Volume a with two snapshots; merging s1 away copies its 8 MiB. Volume b fills the disk.
    const a = (await createVolume('a')).volume!.volumeId;
    await writeChunks(store(), a, 0, 8, 1);
    const s1 = (await controller.call('createSnapshot', { sourceVolumeId: a, name: 's1' })).snapshot!.snapshotId;
    await writeChunks(store(), a, 16 * MiB, 8, 2);
    const s2 = (await controller.call('createSnapshot', { sourceVolumeId: a, name: 's2' })).snapshot!.snapshotId;
    const b = (await createVolume('b')).volume!.volumeId;
    await fillUntilFull(store(), b, 3);
    await exhaustCatalog(store(), b);
    const before = {
      a: fingerprint(store(), { volumeId: a }, SPAN),
      s2: fingerprint(store(), { snapshotId: s2 }, SPAN),
    };

    const noVolume = await failure(createVolume('c'));
    expect(noVolume?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(noVolume?.details).toContain('full');
    const noSnapshot = await failure(controller.call('createSnapshot', { sourceVolumeId: a, name: 's3' }));
    expect(noSnapshot?.code).toBe(status.RESOURCE_EXHAUSTED);
    // Idempotent retries of what exists still answer.
    expect((await createVolume('a')).volume!.volumeId).toBe(a);

    const free = small.freeBytes();
    await controller.call('deleteSnapshot', { snapshotId: s1 });
    await until('the merge that cannot run is counted', async () => {
      return (
        counter(await metrics(run.driver.metricsUrl!), 'cbt_csi_compaction_failures_total{reason="no_space"}') >= 1
      );
    });
    expect(run.logs.some((l) => l.includes('"level":"warn"') && l.includes('compaction failed'))).toBe(true);
    expect(store().spaceUsage().hiddenLayers).toBe(1);

    await controller.call('deleteVolume', { volumeId: b });
    await until('compaction retried and finished', () => store().spaceUsage().hiddenLayers === 0);
    await until('the merged layer is unlinked', () => small.freeBytes() - free > 32 * MiB);
    expect(run.logs.some((l) => l.includes('compaction succeeded after failing'))).toBe(true);

    expect(fingerprint(store(), { volumeId: a }, SPAN)).toBe(before.a);
    expect(fingerprint(store(), { snapshotId: s2 }, SPAN)).toBe(before.s2);
    await createVolume('c');
    const s3 = (await controller.call('createSnapshot', { sourceVolumeId: a, name: 's3' })).snapshot!.snapshotId;

    await run.stop();
    run = await start(config);
    const listed = (await run.controller.call('listSnapshots', {})).entries.map((e) => e.snapshot!.snapshotId).sort();
    expect(listed).toEqual([s2, s3].sort());
    expect(fingerprint(store(), { volumeId: a }, SPAN)).toBe(before.a);
    expect(fingerprint(store(), { snapshotId: s2 }, SPAN)).toBe(before.s2);
  }, 120_000);
});
