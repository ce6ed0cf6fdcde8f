/**
 * ControllerModifyVolume and CreateVolume `mutable_parameters` (CSI spec v1.12.0: "ControllerModifyVolume",
 * its error table, CreateVolume's idempotency and precedence rules; the MODIFY_VOLUME capability), checked
 * over the driver's unix socket with an independent gRPC client. Each test names the rule it checks.
 *
 * The mutable keys are metadataStyle, metadataProfile, objectSize, maxIops and maxBandwidth. Their effect on
 * the SnapshotMetadata service is checked here through its answers; the I/O limits' effect on a published
 * device is checked with fio in test/e2e/io-limits.test.ts.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  BlockMetadataType,
  Controller,
  type CreateVolumeRequestSchema,
  SnapshotMetadata,
  type VolumeCapabilitySchema,
  VolumeCapability_AccessMode_Mode as Mode,
} from '../../src/gen/csi/v1/csi_pb.js';
import type { RpcError } from '../support/csi-client.js';
import { codeOf, ServiceClient } from '../support/csi-client.js';
import { spawnDriver, startTestDriver, type TestDriver } from '../support/test-driver.js';

type CreateInit = MessageInitShape<typeof CreateVolumeRequestSchema>;
type CapabilityInit = MessageInitShape<typeof VolumeCapabilitySchema>;

const KiB = 1024;
const MiB = 1024 * KiB;

const mount: CapabilityInit = {
  accessType: { case: 'mount', value: {} },
  accessMode: { mode: Mode.SINGLE_NODE_WRITER },
};

let seq = 0;
const uniq = (prefix: string) => `${prefix}-${++seq}`;

let d: TestDriver;
beforeAll(async () => {
  d = await startTestDriver();
});
afterAll(async () => {
  await d?.stop();
});

async function createVolume(init: Partial<CreateInit> = {}, controller = d.controller) {
  const request = {
    name: uniq('vol'),
    volumeCapabilities: [mount],
    capacityRange: { requiredBytes: BigInt(8 * MiB) },
    ...init,
  } as CreateInit;
  const res = await controller.call('createVolume', request);
  return res.volume!;
}

function modify(volumeId: string, mutableParameters: Record<string, string>, controller = d.controller) {
  return controller.call('controllerModifyVolume', { volumeId, mutableParameters });
}

/** The message of a rejected call. */
async function rejection(call: Promise<unknown>): Promise<{ code: number; message: string }> {
  try {
    await call;
  } catch (err) {
    return { code: (err as RpcError).code, message: (err as RpcError).details };
  }
  throw new Error('the call succeeded');
}

const attributes = (volumeId: string) => d.driver.store.getVolume(volumeId).attributes;

/** Writes blocks straight into the store and snapshots the volume. */
async function snapshotWith(volumeId: string, blocks: number[], blockSize = 4 * KiB): Promise<string> {
  for (const b of blocks) d.driver.store.write(volumeId, b * blockSize, Buffer.alloc(blockSize, b + 1));
  const res = await d.controller.call('createSnapshot', { sourceVolumeId: volumeId, name: uniq('snap') });
  return res.snapshot!.snapshotId;
}

/** GetMetadataAllocated's answer: the declared type and every tuple. */
async function allocated(snapshotId: string, metadata = d.metadata) {
  const messages = await metadata.collect('getMetadataAllocated', { snapshotId });
  return {
    type: messages[0]?.blockMetadataType,
    tuples: messages.flatMap((m) => m.blockMetadata.map((t) => [Number(t.byteOffset), Number(t.sizeBytes)])),
  };
}

describe('ControllerModifyVolume: errors (spec error table)', () => {
  test('ControllerModifyVolume: a missing volume_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(modify('', { maxIops: '100' }))).toBe(status.INVALID_ARGUMENT);
  });

  test('ControllerModifyVolume: "Volume does not exist" is NOT_FOUND (5)', async () => {
    expect(await codeOf(modify('vol-0000000000000000', { maxIops: '100' }))).toBe(status.NOT_FOUND);
    expect(await codeOf(modify('not-an-id-of-ours', { maxIops: '100' }))).toBe(status.NOT_FOUND);
  });

  test('ControllerModifyVolume: an unknown key is INVALID_ARGUMENT naming the key, and nothing is applied (not even the valid keys beside it)', async () => {
    const vol = await createVolume();
    const before = attributes(vol.volumeId);
    const { code, message } = await rejection(
      modify(vol.volumeId, { maxIops: '300', metadataStyle: 'FIXED', XXX_FakeKey: 'XXX_FakeValue' }),
    );
    expect(code).toBe(status.INVALID_ARGUMENT);
    expect(message).toContain('"XXX_FakeKey"');
    expect(attributes(vol.volumeId)).toEqual(before);
  });

  test('ControllerModifyVolume: blockSize, fixed at creation, is INVALID_ARGUMENT naming it, and nothing is applied', async () => {
    const vol = await createVolume();
    const before = attributes(vol.volumeId);
    const { code, message } = await rejection(modify(vol.volumeId, { blockSize: '8192', maxIops: '300' }));
    expect(code).toBe(status.INVALID_ARGUMENT);
    expect(message).toContain('"blockSize"');
    expect(message).toContain('cannot change');
    expect(attributes(vol.volumeId)).toEqual(before);
    expect(d.driver.store.getVolume(vol.volumeId).blockSize).toBe(4096);
  });

  test.each([
    ['maxIops', '-5'],
    ['maxIops', 'fast'],
    ['maxIops', '1.5'],
    ['maxBandwidth', '10 apples'],
    ['maxBandwidth', '1Ki'], // below the 64 KiB/s floor
    ['metadataStyle', 'CURVY'],
    ['metadataProfile', 'zfs'],
    ['objectSize', '3Mi'],
  ])(
    'ControllerModifyVolume: a bad value (%s=%s) is INVALID_ARGUMENT naming the key, and nothing is applied',
    async (key, value) => {
      const vol = await createVolume({ parameters: { metadataProfile: 'ceph-rbd' } });
      const before = attributes(vol.volumeId);
      const { code, message } = await rejection(modify(vol.volumeId, { maxBandwidth: '8Mi', [key]: value }));
      expect(code).toBe(status.INVALID_ARGUMENT);
      expect(message).toContain(key);
      expect(attributes(vol.volumeId)).toEqual(before);
    },
  );

  test('ControllerModifyVolume: objectSize without the ceph-rbd profile is INVALID_ARGUMENT; with it in the same request it is applied', async () => {
    const vol = await createVolume();
    const { code, message } = await rejection(modify(vol.volumeId, { objectSize: '1Mi' }));
    expect(code).toBe(status.INVALID_ARGUMENT);
    expect(message).toContain('objectSize');
    await modify(vol.volumeId, { metadataProfile: 'ceph-rbd', objectSize: '1Mi' });
    expect(attributes(vol.volumeId)).toMatchObject({ metadataProfile: 'ceph-rbd', objectSize: String(MiB) });
  });
});

describe('ControllerModifyVolume: what it changes', () => {
  test('ControllerModifyVolume: MUST be idempotent (the same request twice is OK and leaves the same attributes)', async () => {
    const vol = await createVolume();
    await modify(vol.volumeId, { maxIops: '250', maxBandwidth: '16Mi' });
    const once = attributes(vol.volumeId);
    await modify(vol.volumeId, { maxIops: '250', maxBandwidth: '16Mi' });
    expect(attributes(vol.volumeId)).toEqual(once);
    expect(once).toMatchObject({ maxIops: '250', maxBandwidth: String(16 * MiB) });
  });

  test('ControllerModifyVolume: "SPs MUST NOT modify volumes based on the absence of keys" (only the keys given change)', async () => {
    const vol = await createVolume({ parameters: { metadataStyle: 'FIXED' }, mutableParameters: { maxIops: '100' } });
    await modify(vol.volumeId, { maxBandwidth: '1Mi' });
    expect(attributes(vol.volumeId)).toMatchObject({
      metadataStyle: 'FIXED',
      maxIops: '100',
      maxBandwidth: String(MiB),
    });
    // An empty map changes nothing (and is not an error: csi-sanity sends one when given no parameters file).
    const before = attributes(vol.volumeId);
    await d.controller.call('controllerModifyVolume', { volumeId: vol.volumeId });
    expect(attributes(vol.volumeId)).toEqual(before);
  });

  test('ControllerModifyVolume: "0" removes a limit', async () => {
    const vol = await createVolume({ mutableParameters: { maxIops: '100', maxBandwidth: '8Mi' } });
    await modify(vol.volumeId, { maxIops: '0' });
    expect(attributes(vol.volumeId)).toMatchObject({ maxIops: '0', maxBandwidth: String(8 * MiB) });
  });

  test('ControllerModifyVolume: maxBandwidth takes bytes, binary (Ki, Mi, Gi) and decimal (k, M, G) units, optionally with B and /s', async () => {
    const vol = await createVolume();
    const cases: [string, number][] = [
      ['8388608', 8 * MiB],
      ['8Mi', 8 * MiB],
      ['8MiB', 8 * MiB],
      ['8Mi/s', 8 * MiB],
      ['512Ki', 512 * KiB],
      ['10M', 10_000_000],
      ['1G', 1e9],
      ['2Gi', 2 * 1024 * MiB],
    ];
    for (const [value, bytes] of cases) {
      await modify(vol.volumeId, { maxBandwidth: value });
      expect(attributes(vol.volumeId).maxBandwidth, value).toBe(String(bytes));
    }
  });

  test('metadataStyle: snapshots taken after the change answer in the new style; one taken before keeps its own', async () => {
    const vol = await createVolume({ parameters: { metadataStyle: 'VARIABLE' } });
    const before = await snapshotWith(vol.volumeId, [0, 1, 2]);
    await modify(vol.volumeId, { metadataStyle: 'FIXED_LENGTH' });
    const after = await snapshotWith(vol.volumeId, [5]);
    const old = await allocated(before);
    expect(old.type).toBe(BlockMetadataType.VARIABLE_LENGTH);
    expect(old.tuples).toEqual([[0, 3 * 4096]]);
    const now = await allocated(after);
    expect(now.type).toBe(BlockMetadataType.FIXED_LENGTH);
    expect(now.tuples).toEqual([
      [0, 4096],
      [4096, 4096],
      [8192, 4096],
      [5 * 4096, 4096],
    ]);
    // And back: the change goes both ways.
    await modify(vol.volumeId, { metadataStyle: 'VARIABLE' });
    expect((await allocated(await snapshotWith(vol.volumeId, []))).type).toBe(BlockMetadataType.VARIABLE_LENGTH);
  });

  test('metadataProfile: a volume changed to ceph-rbd answers in whole objects (objectSize), and to hostpath in 4 KiB FIXED tuples', async () => {
    const vol = await createVolume({
      parameters: { blockSize: '64Ki' },
      capacityRange: { requiredBytes: BigInt(4 * MiB) },
    });
    const exact = await snapshotWith(vol.volumeId, [1, 2], 64 * KiB);
    expect((await allocated(exact)).tuples).toEqual([[64 * KiB, 128 * KiB]]);

    await modify(vol.volumeId, { metadataProfile: 'ceph-rbd', objectSize: '1Mi' });
    const ceph = await allocated(await snapshotWith(vol.volumeId, [20], 64 * KiB));
    expect(ceph.type).toBe(BlockMetadataType.VARIABLE_LENGTH);
    // Blocks 1-2 lie in object 0, block 20 (1.25 MiB) in object 1.
    expect(ceph.tuples).toEqual([
      [0, MiB],
      [MiB, MiB],
    ]);

    await modify(vol.volumeId, { metadataProfile: 'hostpath' });
    const hostpath = await allocated(await snapshotWith(vol.volumeId, [], 64 * KiB));
    expect(hostpath.type).toBe(BlockMetadataType.FIXED_LENGTH);
    expect(hostpath.tuples.length).toBe((3 * 64 * KiB) / (4 * KiB));
    expect(hostpath.tuples.every(([, len]) => len === 4096)).toBe(true);
    // The earlier snapshot still answers as it did when it was taken.
    expect((await allocated(exact)).tuples).toEqual([[64 * KiB, 128 * KiB]]);
  });

  test('ValidateVolumeCapabilities: mutable_parameters that describe the volume are confirmed; ones that do not are not', async () => {
    const vol = await createVolume();
    await modify(vol.volumeId, { maxIops: '700', metadataStyle: 'FIXED' });
    const ok = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [mount],
      mutableParameters: { maxIops: '700', metadataStyle: 'FIXED_LENGTH' },
    });
    expect(ok.confirmed?.mutableParameters).toEqual({ maxIops: '700', metadataStyle: 'FIXED_LENGTH' });
    const stale = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [mount],
      mutableParameters: { maxIops: '500' },
    });
    expect(stale.confirmed).toBeUndefined();
    expect(stale.message).toContain('maxIops is 700');
    // The volume_context made at creation still validates after its metadataStyle changed.
    const ctx = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [mount],
      volumeContext: vol.volumeContext,
    });
    expect(ctx.confirmed).toBeDefined();
  });
});

describe('CreateVolume: mutable_parameters', () => {
  test('CreateVolume: "Values specified in mutable_parameters MUST take precedence over the values from parameters"', async () => {
    const vol = await createVolume({
      parameters: { metadataStyle: 'VARIABLE', maxIops: '100' },
      mutableParameters: { metadataStyle: 'FIXED', maxIops: '900' },
    });
    expect(attributes(vol.volumeId)).toMatchObject({ metadataStyle: 'FIXED', maxIops: '900' });
    expect((await allocated(await snapshotWith(vol.volumeId, [0, 1]))).type).toBe(BlockMetadataType.FIXED_LENGTH);
  });

  test('CreateVolume: an unknown or immutable key in mutable_parameters is INVALID_ARGUMENT naming it, and no volume is made', async () => {
    for (const [key, value] of [
      ['XXX_FakeKey', 'XXX_FakeValue'],
      ['blockSize', '8192'],
    ] as const) {
      const name = uniq('bad-mutable');
      const { code, message } = await rejection(
        d.controller.call('createVolume', {
          name,
          volumeCapabilities: [mount],
          mutableParameters: { maxIops: '100', [key]: value },
        }),
      );
      expect(code).toBe(status.INVALID_ARGUMENT);
      expect(message).toContain(`"${key}"`);
      expect(d.driver.store.findVolumeByName(name)).toBeUndefined();
    }
  });

  test('CreateVolume: idempotent with the same mutable_parameters; the same name with different ones is ALREADY_EXISTS', async () => {
    const name = uniq('idem');
    const request = { name, mutableParameters: { maxIops: '400', metadataProfile: 'hostpath' } };
    const first = await createVolume(request);
    const again = await createVolume(request);
    expect(again.volumeId).toBe(first.volumeId);
    expect(await codeOf(createVolume({ name, mutableParameters: { maxIops: '401' } }))).toBe(status.ALREADY_EXISTS);
    expect(await codeOf(createVolume({ name, mutableParameters: { metadataProfile: 'exact' } }))).toBe(
      status.ALREADY_EXISTS,
    );
  });

  test('StorageClass parameters take the I/O limits too (validated the same way)', async () => {
    const vol = await createVolume({ parameters: { maxIops: '1200', maxBandwidth: '20M' } });
    expect(attributes(vol.volumeId)).toMatchObject({ maxIops: '1200', maxBandwidth: '20000000' });
    expect(await codeOf(createVolume({ parameters: { maxIops: 'lots' } }))).toBe(status.INVALID_ARGUMENT);
  });
});

describe('Persistence of modified attributes', () => {
  test('ControllerModifyVolume: what it stored survives kill -9 and restart (answers, limits and idempotency)', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-modify-kill-'));
    const socket = path.join(dir, 'csi.sock');
    const args = ['--endpoint', `unix://${socket}`, '--state-dir', path.join(dir, 'state'), '--node-id', 'n1'];
    const clients = () => ({
      controller: new ServiceClient(Controller, `unix://${socket}`),
      metadata: new ServiceClient(SnapshotMetadata, `unix://${socket}`),
    });
    let child = (await spawnDriver(args)).child;
    let c = clients();
    try {
      const vol = await createVolume({ parameters: { metadataStyle: 'VARIABLE' } }, c.controller);
      await modify(vol.volumeId, { metadataStyle: 'FIXED', maxIops: '640', maxBandwidth: '32Mi' }, c.controller);
      // SIGKILL right after the answer: nothing else (no graceful close) gets to run.
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
      c.controller.close();
      c.metadata.close();

      child = (await spawnDriver(args)).child;
      c = clients();
      const validated = await c.controller.call('validateVolumeCapabilities', {
        volumeId: vol.volumeId,
        volumeCapabilities: [mount],
        mutableParameters: { metadataStyle: 'FIXED', maxIops: '640', maxBandwidth: String(32 * MiB) },
      });
      expect(validated.confirmed, validated.message).toBeDefined();
      const snap = await c.controller.call('createSnapshot', { sourceVolumeId: vol.volumeId, name: 's' });
      const answer = await c.metadata.collect('getMetadataAllocated', { snapshotId: snap.snapshot!.snapshotId });
      expect(answer[0]?.blockMetadataType).toBe(BlockMetadataType.FIXED_LENGTH);
      await modify(vol.volumeId, { maxIops: '640' }, c.controller);
    } finally {
      c.controller.close();
      c.metadata.close();
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);
});
