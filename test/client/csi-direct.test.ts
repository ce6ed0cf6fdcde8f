/**
 * The client against a real `cbt-csi serve` child process over its unix socket (the CSI-direct transport):
 * typed errors for what the driver refuses, and a listing whose stream is cut by killing the driver and
 * restarting it on the same state directory and socket resumes and equals an uncut run.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectCsiDirect, InvalidArgumentError, NotFoundError, type Extent } from '../../src/client/index.js';
import { Controller } from '../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient } from '../support/csi-client.js';
import { spawnDriver } from '../support/test-driver.js';
import { MiB, blockCap, dataPlaneSuite, startNodeEnv, type NodeEnv } from '../e2e/support/node-env.js';

describe('CSI-direct client against a driver process (controller role, no root needed)', () => {
  let dir: string;
  let child: ChildProcess;
  let controller: ServiceClient<typeof Controller>;
  let target: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-client-'));
    target = `unix://${path.join(dir, 'csi.sock')}`;
    ({ child } = await spawnDriver([
      '--endpoint',
      target,
      '--state-dir',
      path.join(dir, 'state'),
      '--role',
      'controller',
      '--log-level',
      'warn',
    ]));
    controller = new ServiceClient(Controller, target);
  });
  afterAll(async () => {
    controller?.close();
    if (child && child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const volume = async (name: string) =>
    (
      await controller.call('createVolume', {
        name,
        capacityRange: { requiredBytes: BigInt(8 * MiB) },
        volumeCapabilities: [blockCap()],
      })
    ).volume!.volumeId;
  const snapshot = async (volumeId: string, name: string) =>
    (await controller.call('createSnapshot', { sourceVolumeId: volumeId, name })).snapshot!.snapshotId;

  it('reports capacity and style of an empty snapshot, with no extents', async () => {
    const snap = await snapshot(await volume('empty'), 'empty-1');
    const client = connectCsiDirect(target);
    try {
      const listing = await client.allocated(snap);
      expect(listing.capacityBytes).toBe(8 * MiB);
      expect(listing.blockMetadataType).toBe('VARIABLE_LENGTH');
      const got: Extent[] = [];
      for await (const e of listing) got.push(e);
      expect(got).toEqual([]);
    } finally {
      await client.close();
    }
  });

  it('an unknown snapshot is NotFoundError, snapshots of two volumes are InvalidArgumentError, neither retried', async () => {
    const a = await snapshot(await volume('a'), 'a-1');
    const b = await snapshot(await volume('b'), 'b-1');
    const resumes: number[] = [];
    const client = connectCsiDirect(target, { onResume: (r) => resumes.push(r.attempt) });
    try {
      await expect(client.allocated('snap-0000000000000000')).rejects.toBeInstanceOf(NotFoundError);
      await expect(client.delta(a, b)).rejects.toBeInstanceOf(InvalidArgumentError);
      expect(resumes).toEqual([]);
    } finally {
      await client.close();
    }
  });
});

dataPlaneSuite('CSI-direct client: a stream cut by a driver restart resumes', () => {
  let env: NodeEnv;
  beforeAll(async () => {
    env = await startNodeEnv();
  });
  afterAll(async () => {
    await env?.cleanup();
  });

  it('kill -9 and restart of the driver mid-listing: the listing resumes and equals an uncut run', async () => {
    const CAPACITY = 64 * MiB;
    const { volume } = await env.controller.call('createVolume', {
      name: 'cut',
      capacityRange: { requiredBytes: BigInt(CAPACITY) },
      volumeCapabilities: [blockCap()],
    });
    const volumeId = volume!.volumeId;
    const staging = env.path('staging');
    fs.mkdirSync(staging);
    const device = env.path('device');
    await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: blockCap() });
    await env.node.call('nodePublishVolume', {
      volumeId,
      stagingTargetPath: staging,
      targetPath: device,
      volumeCapability: blockCap(),
    });
    // Every other 4 KiB block: 8192 separate extents, far more than HTTP/2 flow control lets the driver
    // send ahead of the reader, so killing the driver really cuts the stream.
    const fd = fs.openSync(device, 'r+');
    const block = Buffer.alloc(4096, 0x5a);
    for (let off = 0; off < CAPACITY; off += 8192) fs.writeSync(fd, block, 0, 4096, off);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const snap = (await env.controller.call('createSnapshot', { sourceVolumeId: volumeId, name: 'cut-1' })).snapshot!
      .snapshotId;
    // The volume is taken down before the driver is killed: only the metadata stream is under test.
    await env.node.call('nodeUnpublishVolume', { volumeId, targetPath: device });
    await env.node.call('nodeUnstageVolume', { volumeId, stagingTargetPath: staging });

    const retry = { initialDelayMs: 50, maxDelayMs: 1000, maxAttempts: 30 };
    const uncutClient = connectCsiDirect(env.target, { retry });
    const uncut: Extent[] = [];
    for await (const e of await uncutClient.allocated(snap, { maxResults: 1 })) uncut.push(e);
    await uncutClient.close();
    expect(uncut.length).toBe(CAPACITY / 8192);

    const client = connectCsiDirect(env.target, { retry });
    const cut: Extent[] = [];
    const listing = await client.allocated(snap, { maxResults: 1 });
    for await (const e of listing) {
      cut.push(e);
      if (cut.length === 100) {
        await env.stopDriver('SIGKILL');
        await env.restartDriver();
      }
    }
    await client.close();
    expect(listing.resumes, 'the stream was cut and resumed').toBeGreaterThanOrEqual(1);
    expect(cut).toEqual(uncut);
    await env.controller.call('deleteSnapshot', { snapshotId: snap });
    await env.controller.call('deleteVolume', { volumeId });
  }, 180_000);
});
