/**
 * CSI Controller service (spec v1.12.0, "Controller Service RPC"), checked over the driver's unix socket
 * with an independent gRPC client (grpc-js). Each test is one MUST, one error-table row, or one rule of
 * DESIGN.md's "CSI surface"; expected sizes are computed from the rule they check (block rounding,
 * source sizes, the provisioning limit), not copied from the implementation's output.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, test, vi } from 'vitest';
import { status } from '@grpc/grpc-js';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { timestampMs } from '@bufbuild/protobuf/wkt';
import { MAX_BLOCKS } from '../../storage-engine/index.js';
import { TOPOLOGY_NODE_KEY, type DriverConfig } from '../../src/config.js';
import { DEFAULT_VOLUME_BYTES } from '../../src/csi/capacity-range.js';
import { ATTR_METADATA_STYLE } from '../../src/csi/volume-parameters.js';
import {
  Controller,
  ControllerServiceCapability_RPC_Type as RpcType,
  type CreateVolumeRequestSchema,
  type Volume,
  type VolumeCapabilitySchema,
  VolumeCapability_AccessMode_Mode as Mode,
} from '../../src/gen/csi/v1/csi_pb.js';
import { createLogger } from '../../src/logging.js';
import { startDriver } from '../../src/server.js';
import { codeOf, ServiceClient } from '../support/csi-client.js';
import {
  largestFileBytes,
  mountSmallExt4,
  smallFileSystemSuite,
  type SmallFileSystem,
} from '../support/small-filesystem.js';
import { startTestDriver, testConfig, type TestDriver } from '../support/test-driver.js';

type CapabilityInit = MessageInitShape<typeof VolumeCapabilitySchema>;
type CreateInit = MessageInitShape<typeof CreateVolumeRequestSchema>;

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const GiB_n = BigInt(GiB);
const BLOCK = 4096; // testConfig's defaultBlockSize

const SINGLE_NODE_MODES = [
  Mode.SINGLE_NODE_WRITER,
  Mode.SINGLE_NODE_READER_ONLY,
  Mode.SINGLE_NODE_SINGLE_WRITER,
  Mode.SINGLE_NODE_MULTI_WRITER,
];
const MULTI_NODE_MODES = [Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER];

function mount(mode: Mode = Mode.SINGLE_NODE_WRITER, fsType = ''): CapabilityInit {
  return { accessType: { case: 'mount', value: { fsType } }, accessMode: { mode } };
}
function block(mode: Mode = Mode.SINGLE_NODE_WRITER): CapabilityInit {
  return { accessType: { case: 'block', value: {} }, accessMode: { mode } };
}

let seq = 0;
/** A name no other test uses. */
function uniq(prefix: string): string {
  return `${prefix}-${++seq}`;
}

const thisNode = (nodeId = 'test-node') => ({ segments: { [TOPOLOGY_NODE_KEY]: nodeId } });

let d: TestDriver;
beforeAll(async () => {
  d = await startTestDriver();
});
afterAll(async () => {
  await d?.stop();
});

/** Drivers a test starts for itself (a different configuration, or a store it inspects whole). */
const extraDrivers: TestDriver[] = [];
async function ownDriver(overrides: Partial<DriverConfig> = {}): Promise<TestDriver> {
  const driver = await startTestDriver(overrides);
  extraDrivers.push(driver);
  return driver;
}
afterEach(async () => {
  for (const driver of extraDrivers.splice(0)) await driver.stop();
});

async function createVolume(init: Partial<CreateInit> = {}, driver: TestDriver = d): Promise<Volume> {
  const request = { name: uniq('vol'), volumeCapabilities: [mount()], ...init } as CreateInit;
  const res = await driver.controller.call('createVolume', request);
  return res.volume!;
}

/**
 * The largest volume a store in `dir` can hold: 2^32 blocks, and its last block inside the largest file the
 * filesystem accepts (asked of the kernel here, not of the driver).
 */
function largestVolumeBytes(dir: string, blockSize: number): number {
  return Math.min(MAX_BLOCKS * blockSize, Math.floor(largestFileBytes(dir) / blockSize) * blockSize);
}

async function createSnapshot(volumeId: string, name = uniq('snap'), driver: TestDriver = d) {
  const res = await driver.controller.call('createSnapshot', { sourceVolumeId: volumeId, name });
  return res.snapshot!;
}

async function listAllVolumes(driver: TestDriver = d) {
  return (await driver.controller.call('listVolumes', {})).entries.map((e) => e.volume!);
}

/** Pages through ListVolumes with max_entries, returning every page. */
async function pagesOfVolumes(driver: TestDriver, maxEntries: number) {
  const pages: string[][] = [];
  let token = '';
  for (;;) {
    const res = await driver.controller.call('listVolumes', { maxEntries, startingToken: token });
    pages.push(res.entries.map((e) => e.volume!.volumeId));
    if (!res.nextToken) return pages;
    token = res.nextToken;
  }
}

describe('ControllerGetCapabilities', () => {
  test('ControllerGetCapabilities: advertises exactly the RPC capabilities DESIGN.md lists as implemented', async () => {
    const res = await d.controller.call('controllerGetCapabilities', {});
    const types = res.capabilities.map((c) => (c.type.case === 'rpc' ? c.type.value.type : -1)).sort((a, b) => a - b);
    const documented = [
      RpcType.CREATE_DELETE_VOLUME,
      RpcType.CREATE_DELETE_SNAPSHOT,
      RpcType.LIST_VOLUMES,
      RpcType.LIST_SNAPSHOTS,
      RpcType.GET_CAPACITY,
      RpcType.CLONE_VOLUME,
      RpcType.EXPAND_VOLUME,
      RpcType.GET_VOLUME,
      RpcType.VOLUME_CONDITION,
      RpcType.SINGLE_NODE_MULTI_WRITER,
      RpcType.MODIFY_VOLUME,
    ].sort((a, b) => a - b);
    expect(types).toEqual(documented);
  });

  test('ControllerGetCapabilities: GET_SNAPSHOT is not advertised (csi-sanity v5.4.0 rejects it), yet GetSnapshot is served', async () => {
    const res = await d.controller.call('controllerGetCapabilities', {});
    const types = res.capabilities.map((c) => (c.type.case === 'rpc' ? c.type.value.type : -1));
    expect(types).not.toContain(RpcType.GET_SNAPSHOT);
    const vol = await createVolume();
    const snap = await createSnapshot(vol.volumeId);
    const got = await d.controller.call('getSnapshot', { snapshotId: snap.snapshotId });
    expect(got.snapshot?.snapshotId).toBe(snap.snapshotId);
  });

  test('ControllerGetCapabilities: PUBLISH_UNPUBLISH_VOLUME, LIST_VOLUMES_PUBLISHED_NODES and PUBLISH_READONLY are not advertised (not implemented)', async () => {
    const res = await d.controller.call('controllerGetCapabilities', {});
    const types = res.capabilities.map((c) => (c.type.case === 'rpc' ? c.type.value.type : -1));
    for (const t of [
      RpcType.PUBLISH_UNPUBLISH_VOLUME,
      RpcType.LIST_VOLUMES_PUBLISHED_NODES,
      RpcType.PUBLISH_READONLY,
    ]) {
      expect(types).not.toContain(t);
    }
  });

  test('ControllerGetCapabilities: every advertised RPC capability is served (its RPC does not answer UNIMPLEMENTED)', async () => {
    const vol = await createVolume();
    const probes: Partial<Record<RpcType, () => Promise<unknown>>> = {
      [RpcType.CREATE_DELETE_VOLUME]: () => d.controller.call('deleteVolume', { volumeId: 'vol-0000000000000000' }),
      [RpcType.CREATE_DELETE_SNAPSHOT]: () =>
        d.controller.call('deleteSnapshot', { snapshotId: 'snap-0000000000000000' }),
      [RpcType.LIST_VOLUMES]: () => d.controller.call('listVolumes', {}),
      [RpcType.LIST_SNAPSHOTS]: () => d.controller.call('listSnapshots', {}),
      [RpcType.GET_CAPACITY]: () => d.controller.call('getCapacity', {}),
      [RpcType.CLONE_VOLUME]: () =>
        createVolume({ volumeContentSource: { type: { case: 'volume', value: { volumeId: vol.volumeId } } } }),
      [RpcType.EXPAND_VOLUME]: () =>
        d.controller.call('controllerExpandVolume', {
          volumeId: vol.volumeId,
          capacityRange: { requiredBytes: 2n * GiB_n },
        }),
      [RpcType.GET_VOLUME]: () => d.controller.call('controllerGetVolume', { volumeId: vol.volumeId }),
      [RpcType.VOLUME_CONDITION]: async () => {
        const res = await d.controller.call('controllerGetVolume', { volumeId: vol.volumeId });
        if (!res.status?.volumeCondition) throw new Error('no volume_condition');
      },
      [RpcType.SINGLE_NODE_MULTI_WRITER]: () =>
        createVolume({ volumeCapabilities: [mount(Mode.SINGLE_NODE_MULTI_WRITER)] }),
      [RpcType.MODIFY_VOLUME]: () =>
        d.controller.call('controllerModifyVolume', { volumeId: vol.volumeId, mutableParameters: { maxIops: '100' } }),
    };
    const res = await d.controller.call('controllerGetCapabilities', {});
    for (const c of res.capabilities) {
      if (c.type.case !== 'rpc') continue;
      const probe = probes[c.type.value.type];
      expect(probe, `a probe for capability ${RpcType[c.type.value.type]}`).toBeDefined();
      expect(await codeOf(probe!()), RpcType[c.type.value.type]).toBe(status.OK);
    }
  });
});

describe('CreateVolume: required fields and validation', () => {
  test('CreateVolume: a missing name is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('createVolume', { volumeCapabilities: [mount()] }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('CreateVolume: a name with a banned control character (U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F) is INVALID_ARGUMENT', async () => {
    for (const ch of ['\u0000', '\u0008', '\u000B', '\u000C', '\u001F', '\u007F', '\u009F']) {
      const name = `bad${ch}name`;
      expect(await codeOf(d.controller.call('createVolume', { name, volumeCapabilities: [mount()] }))).toBe(
        status.INVALID_ARGUMENT,
      );
    }
  });

  test('CreateVolume: names with ordinary whitespace and any other Unicode are allowed', async () => {
    const vol = await createVolume({ name: uniq('tab\there newline\ncarriage\r ünïcødé 卷') });
    expect(vol.volumeId).not.toBe('');
  });

  test('CreateVolume: missing volume_capabilities is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('createVolume', { name: uniq('nocaps') }))).toBe(status.INVALID_ARGUMENT);
  });

  test('CreateVolume: a capability without access_type is INVALID_ARGUMENT', async () => {
    const cap: CapabilityInit = { accessMode: { mode: Mode.SINGLE_NODE_WRITER } };
    expect(await codeOf(d.controller.call('createVolume', { name: uniq('v'), volumeCapabilities: [cap] }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('CreateVolume: a capability without access_mode (or mode UNKNOWN) is INVALID_ARGUMENT', async () => {
    const noMode: CapabilityInit = { accessType: { case: 'block', value: {} } };
    const unknown = block(Mode.UNKNOWN);
    for (const cap of [noMode, unknown]) {
      expect(await codeOf(d.controller.call('createVolume', { name: uniq('v'), volumeCapabilities: [cap] }))).toBe(
        status.INVALID_ARGUMENT,
      );
    }
  });

  test('CreateVolume: every SINGLE_NODE_* access mode is accepted, for block and for mount access', async () => {
    for (const mode of SINGLE_NODE_MODES) {
      for (const cap of [block(mode), mount(mode)]) {
        const vol = await createVolume({ volumeCapabilities: [cap] });
        expect(vol.volumeId).toMatch(/^vol-[0-9a-f]{16}$/);
      }
    }
  });

  test('CreateVolume: a MULTI_NODE_* access mode cannot be satisfied by a single-node volume and is INVALID_ARGUMENT', async () => {
    for (const mode of MULTI_NODE_MODES) {
      for (const cap of [block(mode), mount(mode)]) {
        expect(
          await codeOf(d.controller.call('createVolume', { name: uniq('multi'), volumeCapabilities: [cap] })),
        ).toBe(status.INVALID_ARGUMENT);
      }
    }
  });

  test('CreateVolume: the volume must satisfy ALL listed capabilities, so one unsupported entry among supported ones is INVALID_ARGUMENT', async () => {
    const caps = [mount(), block(), block(Mode.MULTI_NODE_READER_ONLY)];
    expect(await codeOf(d.controller.call('createVolume', { name: uniq('mixed'), volumeCapabilities: caps }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('CreateVolume: mount fs_type ext4, xfs or empty is accepted; another filesystem is INVALID_ARGUMENT', async () => {
    for (const fsType of ['', 'ext4', 'xfs'])
      await createVolume({ volumeCapabilities: [mount(Mode.SINGLE_NODE_WRITER, fsType)] });
    expect(
      await codeOf(
        d.controller.call('createVolume', {
          name: uniq('fs'),
          volumeCapabilities: [mount(Mode.SINGLE_NODE_WRITER, 'ntfs')],
        }),
      ),
    ).toBe(status.INVALID_ARGUMENT);
  });

  test('CreateVolume: an unknown parameter is INVALID_ARGUMENT', async () => {
    const call = d.controller.call('createVolume', {
      name: uniq('param'),
      volumeCapabilities: [mount()],
      parameters: { blocksize: '4096' },
    });
    expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
  });

  test('CreateVolume: an invalid blockSize or metadataStyle parameter is INVALID_ARGUMENT', async () => {
    for (const parameters of [{ blockSize: '3000' }, { blockSize: '2Mi' }, { metadataStyle: 'SPARSE' }] as Record<
      string,
      string
    >[]) {
      const call = d.controller.call('createVolume', {
        name: uniq('param'),
        volumeCapabilities: [mount()],
        parameters,
      });
      expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
    }
  });

  test('CreateVolume: parameters the provisioner adds itself (csi.storage.k8s.io/*) are accepted', async () => {
    const vol = await createVolume({
      parameters: { 'csi.storage.k8s.io/pvc/name': 'data', 'csi.storage.k8s.io/pvc/namespace': 'default' },
    });
    expect(vol.volumeId).not.toBe('');
  });

  test('CreateVolume: an unknown key in mutable_parameters is INVALID_ARGUMENT', async () => {
    const call = d.controller.call('createVolume', {
      name: uniq('mut'),
      volumeCapabilities: [mount()],
      mutableParameters: { iops: '100' },
    });
    expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
  });

  test('CreateVolume: a volume_content_source with neither snapshot nor volume is INVALID_ARGUMENT', async () => {
    const call = d.controller.call('createVolume', {
      name: uniq('src'),
      volumeCapabilities: [mount()],
      volumeContentSource: {},
    });
    expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
  });
});

describe('CreateVolume: capacity_range', () => {
  test('CreateVolume: a negative required_bytes or limit_bytes is INVALID_ARGUMENT (the values MUST NOT be negative)', async () => {
    for (const capacityRange of [
      { requiredBytes: -1n },
      { limitBytes: -4096n },
      { requiredBytes: -1n, limitBytes: 4096n },
    ]) {
      const call = d.controller.call('createVolume', {
        name: uniq('neg'),
        volumeCapabilities: [mount()],
        capacityRange,
      });
      expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
    }
  });

  test('CreateVolume: limit_bytes smaller than required_bytes is INVALID_ARGUMENT', async () => {
    const call = d.controller.call('createVolume', {
      name: uniq('inv'),
      volumeCapabilities: [mount()],
      capacityRange: { requiredBytes: 2n * 1048576n, limitBytes: 1048576n },
    });
    expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
  });

  test('CreateVolume: with no capacity_range the volume gets the documented default size', async () => {
    const vol = await createVolume();
    expect(vol.capacityBytes).toBe(BigInt(DEFAULT_VOLUME_BYTES));
  });

  test("CreateVolume: required_bytes is rounded up to a whole number of blocks of the volume's block size", async () => {
    for (const [blockSize, required] of [
      [4096, 1],
      [4096, 4097],
      [65536, 100_000],
      [1048576, 3 * MiB + 1],
    ] as const) {
      const vol = await createVolume({
        capacityRange: { requiredBytes: BigInt(required) },
        parameters: { blockSize: String(blockSize) },
      });
      expect(vol.capacityBytes).toBe(BigInt(Math.ceil(required / blockSize) * blockSize));
    }
  });

  test('CreateVolume: an exact size (required == limit, block aligned) gives exactly that size', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: 40960n, limitBytes: 40960n } });
    expect(vol.capacityBytes).toBe(40960n);
  });

  test('CreateVolume: with only limit_bytes the volume is no bigger than the limit', async () => {
    const limit = 10 * MiB + 123;
    const vol = await createVolume({ capacityRange: { limitBytes: BigInt(limit) } });
    expect(Number(vol.capacityBytes)).toBeLessThanOrEqual(limit);
    expect(Number(vol.capacityBytes)).toBeGreaterThan(0);
    expect(Number(vol.capacityBytes) % BLOCK).toBe(0);
  });

  test('CreateVolume: a range no whole number of blocks fits in is OUT_OF_RANGE', async () => {
    for (const capacityRange of [
      { requiredBytes: 4097n, limitBytes: 8191n },
      { limitBytes: 4095n },
      { requiredBytes: 1n, limitBytes: 100n },
    ]) {
      const call = d.controller.call('createVolume', {
        name: uniq('oor'),
        volumeCapabilities: [mount()],
        capacityRange,
      });
      expect(await codeOf(call)).toBe(status.OUT_OF_RANGE);
    }
  });

  test('CreateVolume: a size beyond what a volume can address (2^32 blocks) is OUT_OF_RANGE', async () => {
    const tooBig = BigInt(MAX_BLOCKS) * BigInt(BLOCK) + BigInt(BLOCK);
    for (const requiredBytes of [tooBig, 2n ** 62n]) {
      const call = d.controller.call('createVolume', {
        name: uniq('huge'),
        volumeCapabilities: [block()],
        capacityRange: { requiredBytes },
      });
      expect(await codeOf(call)).toBe(status.OUT_OF_RANGE);
    }
  });

  test('CreateVolume: the largest size the state filesystem holds (2^32 blocks, or its largest file) is accepted (volumes are thin), and its last block works', async () => {
    const largest = largestVolumeBytes(d.driver.store.dir, BLOCK);
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(largest) } });
    expect(vol.capacityBytes).toBe(BigInt(largest));
    const data = Buffer.alloc(BLOCK, 0x5a);
    d.driver.store.write(vol.volumeId, largest - BLOCK, data);
    await d.driver.store.flush(vol.volumeId);
    expect(d.driver.store.read(vol.volumeId, largest - BLOCK, BLOCK)).toEqual(data);
    await d.controller.call('deleteVolume', { volumeId: vol.volumeId });
  });

  test('CreateVolume: one block past the largest size the state filesystem holds is OUT_OF_RANGE', async () => {
    const largest = largestVolumeBytes(d.driver.store.dir, BLOCK);
    const call = d.controller.call('createVolume', {
      name: uniq('past-largest'),
      volumeCapabilities: [block()],
      capacityRange: { requiredBytes: BigInt(largest + BLOCK) },
    });
    expect(await codeOf(call)).toBe(status.OUT_OF_RANGE);
  });
});

describe('CreateVolume: response', () => {
  test('CreateVolume: volume_context carries the block size and metadata style the volume was created with', async () => {
    const vol = await createVolume({ parameters: { blockSize: '64Ki', metadataStyle: 'FIXED_LENGTH' } });
    expect(vol.volumeContext).toEqual({
      blockSize: String(64 * KiB),
      metadataStyle: 'FIXED',
      metadataProfile: 'exact',
    });
    const dflt = await createVolume();
    expect(dflt.volumeContext).toEqual({
      blockSize: String(BLOCK),
      metadataStyle: 'VARIABLE',
      metadataProfile: 'exact',
    });
  });

  test('CreateVolume: volume_context carries the metadataProfile (and a ceph-rbd objectSize) the volume answers SnapshotMetadata with', async () => {
    const ceph = await createVolume({ parameters: { metadataProfile: 'ceph-rbd', objectSize: '1Mi' } });
    expect(ceph.volumeContext).toMatchObject({ metadataProfile: 'ceph-rbd', objectSize: String(MiB) });
    const cephDefault = await createVolume({ parameters: { metadataProfile: 'ceph-rbd' } });
    expect(cephDefault.volumeContext).toMatchObject({ metadataProfile: 'ceph-rbd', objectSize: String(4 * MiB) });
    const hostpath = await createVolume({ parameters: { metadataProfile: 'hostpath' } });
    expect(hostpath.volumeContext.metadataProfile).toBe('hostpath');
    expect(hostpath.volumeContext).not.toHaveProperty('objectSize');
    // The same context from ControllerGetVolume and ListVolumes: it is the volume's, not the request's.
    const got = await d.controller.call('controllerGetVolume', { volumeId: ceph.volumeId });
    expect(got.volume!.volumeContext).toEqual(ceph.volumeContext);
    // Without a metadataProfile parameter, the driver's default (serve --metadata-profile) is the volume's.
    const own = await ownDriver({ defaultMetadataProfile: 'hostpath' });
    expect((await createVolume({}, own)).volumeContext.metadataProfile).toBe('hostpath');
  });

  test('CreateVolume: accessible_topology is exactly this node', async () => {
    const vol = await createVolume();
    expect(vol.accessibleTopology.map((t) => t.segments)).toEqual([{ [TOPOLOGY_NODE_KEY]: 'test-node' }]);
  });

  test('CreateVolume: an empty volume reports no content_source', async () => {
    const vol = await createVolume();
    expect(vol.contentSource).toBeUndefined();
  });

  test('CreateVolume: the metadata style is stored with the volume in the block store', async () => {
    const vol = await createVolume({ parameters: { metadataStyle: 'FIXED' } });
    expect(d.driver.store.getVolume(vol.volumeId).attributes[ATTR_METADATA_STYLE]).toBe('FIXED');
  });
});

describe('CreateVolume: accessibility_requirements', () => {
  test('CreateVolume: a requisite list that does not include this node is RESOURCE_EXHAUSTED', async () => {
    const call = d.controller.call('createVolume', {
      name: uniq('topo'),
      volumeCapabilities: [mount()],
      accessibilityRequirements: { requisite: [thisNode('other-node')], preferred: [thisNode('other-node')] },
    });
    expect(await codeOf(call)).toBe(status.RESOURCE_EXHAUSTED);
  });

  test('CreateVolume: a requisite topology with a segment key this driver does not report is not this node (RESOURCE_EXHAUSTED)', async () => {
    const call = d.controller.call('createVolume', {
      name: uniq('topo'),
      volumeCapabilities: [mount()],
      accessibilityRequirements: {
        requisite: [{ segments: { [TOPOLOGY_NODE_KEY]: 'test-node', 'topology.kubernetes.io/zone': 'z1' } }],
      },
    });
    expect(await codeOf(call)).toBe(status.RESOURCE_EXHAUSTED);
  });

  test('CreateVolume: a requisite list that includes this node among others provisions here', async () => {
    const vol = await createVolume({
      accessibilityRequirements: {
        requisite: [thisNode('node-a'), thisNode('test-node'), thisNode('node-b')],
        preferred: [thisNode('node-a'), thisNode('test-node')],
      },
    });
    expect(vol.accessibleTopology.map((t) => t.segments)).toEqual([{ [TOPOLOGY_NODE_KEY]: 'test-node' }]);
  });

  test('CreateVolume: preferred topologies alone do not bind (the plugin MAY choose any topology), so the volume is made here', async () => {
    const vol = await createVolume({ accessibilityRequirements: { preferred: [thisNode('node-a')] } });
    expect(vol.accessibleTopology.map((t) => t.segments)).toEqual([{ [TOPOLOGY_NODE_KEY]: 'test-node' }]);
  });
});

describe('CreateVolume: idempotency by name', () => {
  test('CreateVolume: a second call with the same name and the same arguments returns the same volume', async () => {
    const name = uniq('idem');
    const args: CreateInit = {
      name,
      volumeCapabilities: [mount()],
      capacityRange: { requiredBytes: 8n * BigInt(MiB) },
      parameters: { blockSize: '8Ki', metadataStyle: 'FIXED' },
    };
    const a = await d.controller.call('createVolume', args);
    const b = await d.controller.call('createVolume', args);
    expect(b.volume).toEqual(a.volume);
  });

  test('CreateVolume: a second call whose capacity_range the existing volume satisfies returns the same volume', async () => {
    const name = uniq('idem-range');
    const a = await createVolume({ name, capacityRange: { requiredBytes: 8n * BigInt(MiB) } });
    const b = await createVolume({
      name,
      capacityRange: { requiredBytes: 4n * BigInt(MiB), limitBytes: 16n * BigInt(MiB) },
    });
    expect(b.volumeId).toBe(a.volumeId);
    expect(b.capacityBytes).toBe(a.capacityBytes);
  });

  test('CreateVolume: a second call with other supported capabilities returns the same volume (capabilities are not properties of the volume)', async () => {
    const name = uniq('idem-caps');
    const a = await createVolume({ name, volumeCapabilities: [mount()] });
    const b = await createVolume({ name, volumeCapabilities: [block(Mode.SINGLE_NODE_READER_ONLY)] });
    expect(b.volumeId).toBe(a.volumeId);
  });

  test('CreateVolume: the same name with a capacity_range the volume does not satisfy is ALREADY_EXISTS', async () => {
    const name = uniq('clash-size');
    await createVolume({ name, capacityRange: { requiredBytes: 8n * BigInt(MiB) } });
    for (const capacityRange of [{ requiredBytes: 16n * BigInt(MiB) }, { limitBytes: 4n * BigInt(MiB) }]) {
      expect(
        await codeOf(d.controller.call('createVolume', { name, volumeCapabilities: [mount()], capacityRange })),
      ).toBe(status.ALREADY_EXISTS);
    }
  });

  test('CreateVolume: the same name with different parameters is ALREADY_EXISTS', async () => {
    const name = uniq('clash-params');
    await createVolume({ name, parameters: { blockSize: '4096', metadataStyle: 'VARIABLE' } });
    for (const parameters of [{ blockSize: '8192' }, { metadataStyle: 'FIXED' }] as Record<string, string>[]) {
      expect(await codeOf(d.controller.call('createVolume', { name, volumeCapabilities: [mount()], parameters }))).toBe(
        status.ALREADY_EXISTS,
      );
    }
  });

  test('CreateVolume: the same name with a different metadataProfile or objectSize is ALREADY_EXISTS; the same profile, or none named, returns the volume', async () => {
    const name = uniq('clash-profile');
    const first = await createVolume({ name, parameters: { metadataProfile: 'ceph-rbd', objectSize: '1Mi' } });
    for (const parameters of [
      { metadataProfile: 'hostpath' },
      { metadataProfile: 'exact' },
      { metadataProfile: 'ceph-rbd', objectSize: '2Mi' },
    ] as Record<string, string>[]) {
      const err = await d.controller
        .call('createVolume', { name, volumeCapabilities: [mount()], parameters })
        .catch((e: { code: number; details: string }) => e);
      expect((err as { code: number }).code, JSON.stringify(parameters)).toBe(status.ALREADY_EXISTS);
      expect((err as { details: string }).details).toMatch(/metadataProfile is ceph-rbd|objectSize is 1048576/);
    }
    const retries: Record<string, string>[] = [
      { metadataProfile: 'ceph-rbd', objectSize: '1Mi' },
      { metadataProfile: 'ceph-rbd' },
      {},
    ];
    for (const parameters of retries) {
      const again = await createVolume({ name, parameters });
      expect(again.volumeId).toBe(first.volumeId);
    }
  });

  test('CreateVolume: the same name with a different volume_content_source is ALREADY_EXISTS', async () => {
    const src = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    const snap = await createSnapshot(src.volumeId);
    const name = uniq('clash-src');
    await createVolume({ name, capacityRange: { requiredBytes: BigInt(MiB) } });
    for (const type of [
      { case: 'snapshot' as const, value: { snapshotId: snap.snapshotId } },
      { case: 'volume' as const, value: { volumeId: src.volumeId } },
    ]) {
      const call = d.controller.call('createVolume', {
        name,
        volumeCapabilities: [mount()],
        volumeContentSource: { type },
      });
      expect(await codeOf(call)).toBe(status.ALREADY_EXISTS);
    }
  });

  test('CreateVolume: the same name with a requisite topology that excludes this node is ALREADY_EXISTS', async () => {
    const name = uniq('clash-topo');
    await createVolume({ name });
    const call = d.controller.call('createVolume', {
      name,
      volumeCapabilities: [mount()],
      accessibilityRequirements: { requisite: [thisNode('node-elsewhere')] },
    });
    expect(await codeOf(call)).toBe(status.ALREADY_EXISTS);
  });

  test('CreateVolume: 10 concurrent calls with the same name make exactly one volume', async () => {
    const own = await ownDriver();
    const name = 'concurrent';
    const results = await Promise.all(
      Array.from({ length: 10 }, () => createVolume({ name, capacityRange: { requiredBytes: BigInt(MiB) } }, own)),
    );
    expect(new Set(results.map((v) => v.volumeId)).size).toBe(1);
    expect((await listAllVolumes(own)).length).toBe(1);
  });

  test('CreateVolume: concurrent same-name clones that differ only in an unspecified parameter make one volume and all succeed', async () => {
    // Half name metadataStyle FIXED, half leave it to the default (VARIABLE): whichever is made first answers
    // both, since a request that names no style accepts any. Clones make the engine await a flush, so the
    // calls really overlap.
    const own = await ownDriver();
    const src = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } }, own);
    own.driver.store.write(src.volumeId, 0, Buffer.alloc(BLOCK, 3));
    const name = 'concurrent-mixed';
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        createVolume(
          {
            name,
            parameters: i % 2 === 0 ? { metadataStyle: 'FIXED' } : {},
            volumeContentSource: { type: { case: 'volume', value: { volumeId: src.volumeId } } },
          },
          own,
        ),
      ),
    );
    expect(new Set(results.map((v) => v.volumeId)).size).toBe(1);
    expect((await listAllVolumes(own)).length).toBe(2);
  });

  test('CreateVolume: 10 concurrent same-name clones of a volume make exactly one clone', async () => {
    const own = await ownDriver();
    const src = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } }, own);
    own.driver.store.write(src.volumeId, 0, Buffer.alloc(BLOCK, 7));
    const name = 'concurrent-clone';
    const results = await Promise.all(
      Array.from({ length: 10 }, () =>
        createVolume(
          { name, volumeContentSource: { type: { case: 'volume', value: { volumeId: src.volumeId } } } },
          own,
        ),
      ),
    );
    expect(new Set(results.map((v) => v.volumeId)).size).toBe(1);
    expect((await listAllVolumes(own)).length).toBe(2);
  });
});

describe('CreateVolume: from a snapshot or a volume', () => {
  /** A volume with a recognisable pattern in its first and last block, and a snapshot of it. */
  async function sourceWithData(capacity = 2 * MiB, blockSize = BLOCK) {
    const src = await createVolume({
      capacityRange: { requiredBytes: BigInt(capacity) },
      parameters: { blockSize: String(blockSize), metadataStyle: 'FIXED' },
    });
    const first = Buffer.alloc(blockSize, 0xa1);
    const last = Buffer.alloc(blockSize, 0xb2);
    d.driver.store.write(src.volumeId, 0, first);
    d.driver.store.write(src.volumeId, capacity - blockSize, last);
    const snap = await createSnapshot(src.volumeId);
    return { src, snap, capacity, blockSize, first, last };
  }

  test("CreateVolume: from a snapshot, the new volume holds the snapshot's data and reports it as content_source", async () => {
    const { snap, capacity, blockSize, first, last } = await sourceWithData();
    const vol = await createVolume({
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    expect(vol.contentSource?.type).toEqual({
      case: 'snapshot',
      value: expect.objectContaining({ snapshotId: snap.snapshotId }),
    });
    expect(d.driver.store.read(vol.volumeId, 0, blockSize)).toEqual(first);
    expect(d.driver.store.read(vol.volumeId, capacity - blockSize, blockSize)).toEqual(last);
  });

  test("CreateVolume: from a snapshot with no capacity_range, the volume is the snapshot's size and block size", async () => {
    const { snap, capacity } = await sourceWithData(3 * MiB, 16 * KiB);
    const vol = await createVolume({
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    expect(vol.capacityBytes).toBe(BigInt(capacity));
    expect(vol.volumeContext.blockSize).toBe(String(16 * KiB));
  });

  test('CreateVolume: from a snapshot, a larger required size gives a larger volume that still holds the data', async () => {
    const { snap, capacity, blockSize, last } = await sourceWithData();
    const vol = await createVolume({
      capacityRange: { requiredBytes: BigInt(capacity * 2) },
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    expect(vol.capacityBytes).toBe(BigInt(capacity * 2));
    expect(d.driver.store.read(vol.volumeId, capacity - blockSize, blockSize)).toEqual(last);
    expect(d.driver.store.read(vol.volumeId, capacity, blockSize)).toEqual(Buffer.alloc(blockSize));
  });

  test("CreateVolume: from a snapshot, a required size below the snapshot's still gives the snapshot's size (the range only sets a minimum)", async () => {
    const { snap, capacity } = await sourceWithData();
    const vol = await createVolume({
      capacityRange: { requiredBytes: BigInt(capacity / 2) },
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    expect(vol.capacityBytes).toBe(BigInt(capacity));
  });

  test("CreateVolume: from a snapshot, a limit_bytes below the snapshot's size is OUT_OF_RANGE", async () => {
    const { snap, capacity } = await sourceWithData();
    const call = d.controller.call('createVolume', {
      name: uniq('small'),
      volumeCapabilities: [mount()],
      capacityRange: { limitBytes: BigInt(capacity - BLOCK) },
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    expect(await codeOf(call)).toBe(status.OUT_OF_RANGE);
  });

  test('CreateVolume: a source snapshot that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const snapshotId of ['snap-0123456789abcdef', '../../etc/passwd', 'vol-0123456789abcdef']) {
      const call = d.controller.call('createVolume', {
        name: uniq('nosnap'),
        volumeCapabilities: [mount()],
        volumeContentSource: { type: { case: 'snapshot', value: { snapshotId } } },
      });
      expect(await codeOf(call)).toBe(status.NOT_FOUND);
    }
  });

  test('CreateVolume: a source with an empty ID is INVALID_ARGUMENT (a required field)', async () => {
    for (const type of [
      { case: 'snapshot' as const, value: { snapshotId: '' } },
      { case: 'volume' as const, value: { volumeId: '' } },
    ]) {
      const call = d.controller.call('createVolume', {
        name: uniq('empty-src'),
        volumeCapabilities: [mount()],
        volumeContentSource: { type },
      });
      expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
    }
  });

  test("CreateVolume: a blockSize parameter that differs from the source's is INVALID_ARGUMENT (source incompatible)", async () => {
    const { src, snap } = await sourceWithData(MiB, BLOCK);
    for (const type of [
      { case: 'snapshot' as const, value: { snapshotId: snap.snapshotId } },
      { case: 'volume' as const, value: { volumeId: src.volumeId } },
    ]) {
      const call = d.controller.call('createVolume', {
        name: uniq('bs'),
        volumeCapabilities: [mount()],
        parameters: { blockSize: '8192' },
        volumeContentSource: { type },
      });
      expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
    }
  });

  test("CreateVolume: from a volume (clone), the new volume holds the source's current data and reports it as content_source", async () => {
    const { src, capacity, blockSize, first } = await sourceWithData();
    const later = Buffer.alloc(blockSize, 0xc3);
    d.driver.store.write(src.volumeId, blockSize, later);
    const vol = await createVolume({
      volumeContentSource: { type: { case: 'volume', value: { volumeId: src.volumeId } } },
    });
    expect(vol.contentSource?.type).toEqual({
      case: 'volume',
      value: expect.objectContaining({ volumeId: src.volumeId }),
    });
    expect(vol.capacityBytes).toBe(BigInt(capacity));
    expect(d.driver.store.read(vol.volumeId, 0, 2 * blockSize)).toEqual(Buffer.concat([first, later]));
  });

  test('CreateVolume: a source volume that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const volumeId of ['vol-0123456789abcdef', '../state/store']) {
      const call = d.controller.call('createVolume', {
        name: uniq('novol'),
        volumeCapabilities: [mount()],
        volumeContentSource: { type: { case: 'volume', value: { volumeId } } },
      });
      expect(await codeOf(call)).toBe(status.NOT_FOUND);
    }
  });

  test('CreateVolume: a retry of a restore succeeds with the same volume after its source snapshot was deleted', async () => {
    const { snap } = await sourceWithData();
    const name = uniq('restore-retry');
    const args: Partial<CreateInit> = {
      name,
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    };
    const a = await createVolume(args);
    await d.controller.call('deleteSnapshot', { snapshotId: snap.snapshotId });
    const b = await createVolume(args);
    expect(b.volumeId).toBe(a.volumeId);
    expect(b.contentSource?.type.case).toBe('snapshot');
  });
});

describe('DeleteVolume', () => {
  test('DeleteVolume: a missing volume_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('deleteVolume', {}))).toBe(status.INVALID_ARGUMENT);
  });

  test('DeleteVolume: deletes the volume (ControllerGetVolume then says NOT_FOUND, ListVolumes omits it)', async () => {
    const vol = await createVolume();
    await d.controller.call('deleteVolume', { volumeId: vol.volumeId });
    expect(await codeOf(d.controller.call('controllerGetVolume', { volumeId: vol.volumeId }))).toBe(status.NOT_FOUND);
    expect((await listAllVolumes()).map((v) => v.volumeId)).not.toContain(vol.volumeId);
  });

  test('DeleteVolume: a volume that does not exist (or was already deleted) is OK', async () => {
    const vol = await createVolume();
    await d.controller.call('deleteVolume', { volumeId: vol.volumeId });
    for (const volumeId of [vol.volumeId, 'vol-ffffffffffffffff', '../../etc', 'snap-0123456789abcdef']) {
      expect(await codeOf(d.controller.call('deleteVolume', { volumeId }))).toBe(status.OK);
    }
  });

  test('DeleteVolume: a volume in use is FAILED_PRECONDITION and is not deleted', async () => {
    const vol = await createVolume();
    d.driver.store.hold(vol.volumeId, 'test-node-plane');
    try {
      expect(await codeOf(d.controller.call('deleteVolume', { volumeId: vol.volumeId }))).toBe(
        status.FAILED_PRECONDITION,
      );
      expect((await d.controller.call('controllerGetVolume', { volumeId: vol.volumeId })).volume?.volumeId).toBe(
        vol.volumeId,
      );
    } finally {
      d.driver.store.release(vol.volumeId, 'test-node-plane');
    }
    expect(await codeOf(d.controller.call('deleteVolume', { volumeId: vol.volumeId }))).toBe(status.OK);
  });

  test('DeleteVolume: snapshots outlive their volume: still listed, and still usable as a source', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    const data = Buffer.alloc(BLOCK, 0x5a);
    d.driver.store.write(vol.volumeId, 0, data);
    const snap = await createSnapshot(vol.volumeId);
    await d.controller.call('deleteVolume', { volumeId: vol.volumeId });
    const listed = await d.controller.call('listSnapshots', { snapshotId: snap.snapshotId });
    expect(listed.entries.map((e) => e.snapshot?.snapshotId)).toEqual([snap.snapshotId]);
    const restored = await createVolume({
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    expect(d.driver.store.read(restored.volumeId, 0, BLOCK)).toEqual(data);
  });
});

describe('ValidateVolumeCapabilities', () => {
  test('ValidateVolumeCapabilities: a missing volume_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('validateVolumeCapabilities', { volumeCapabilities: [mount()] }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('ValidateVolumeCapabilities: missing volume_capabilities is INVALID_ARGUMENT', async () => {
    const vol = await createVolume();
    expect(await codeOf(d.controller.call('validateVolumeCapabilities', { volumeId: vol.volumeId }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('ValidateVolumeCapabilities: a volume that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const volumeId of ['vol-0123456789abcdef', '/etc/passwd']) {
      expect(
        await codeOf(d.controller.call('validateVolumeCapabilities', { volumeId, volumeCapabilities: [mount()] })),
      ).toBe(status.NOT_FOUND);
    }
  });

  test('ValidateVolumeCapabilities: supported capabilities are confirmed, echoing what was validated', async () => {
    const vol = await createVolume();
    const caps = [mount(Mode.SINGLE_NODE_WRITER, 'xfs'), block(Mode.SINGLE_NODE_MULTI_WRITER)];
    const res = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: caps,
      volumeContext: vol.volumeContext,
    });
    expect(res.confirmed).toBeDefined();
    expect(res.confirmed!.volumeCapabilities.map((c) => [c.accessType.case, c.accessMode?.mode])).toEqual([
      ['mount', Mode.SINGLE_NODE_WRITER],
      ['block', Mode.SINGLE_NODE_MULTI_WRITER],
    ]);
    expect(res.confirmed!.volumeContext).toEqual(vol.volumeContext);
  });

  test('ValidateVolumeCapabilities: confirmed is set only if ALL capabilities are supported; otherwise a message says why', async () => {
    const vol = await createVolume();
    for (const caps of [
      [block(Mode.MULTI_NODE_MULTI_WRITER)],
      [mount(), mount(Mode.MULTI_NODE_READER_ONLY)],
      [mount(Mode.SINGLE_NODE_WRITER, 'zfs')],
    ]) {
      const res = await d.controller.call('validateVolumeCapabilities', {
        volumeId: vol.volumeId,
        volumeCapabilities: caps,
      });
      expect(res.confirmed).toBeUndefined();
      expect(res.message).not.toBe('');
    }
  });

  test("ValidateVolumeCapabilities: a volume_context that is not the volume's is not confirmed", async () => {
    const vol = await createVolume();
    const res = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [mount()],
      volumeContext: { ...vol.volumeContext, blockSize: '1048576' },
    });
    expect(res.confirmed).toBeUndefined();
    expect(res.message).not.toBe('');
  });

  test('ValidateVolumeCapabilities: parameters are confirmed when they describe the volume, not otherwise', async () => {
    const vol = await createVolume({ parameters: { blockSize: '16Ki', metadataStyle: 'FIXED' } });
    const ok = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [mount()],
      parameters: { blockSize: '16384', metadataStyle: 'FIXED_LENGTH' },
    });
    expect(ok.confirmed?.parameters).toEqual({ blockSize: '16384', metadataStyle: 'FIXED_LENGTH' });
    for (const parameters of [{ blockSize: '4096' }, { metadataStyle: 'VARIABLE' }, { colour: 'blue' }] as Record<
      string,
      string
    >[]) {
      const res = await d.controller.call('validateVolumeCapabilities', {
        volumeId: vol.volumeId,
        volumeCapabilities: [mount()],
        parameters,
      });
      expect(res.confirmed).toBeUndefined();
      expect(res.message).not.toBe('');
    }
  });

  test("ValidateVolumeCapabilities: metadataProfile and objectSize parameters are confirmed when they are the volume's, not otherwise", async () => {
    const vol = await createVolume({ parameters: { metadataProfile: 'ceph-rbd', objectSize: '2Mi' } });
    const validate = (parameters: Record<string, string>) =>
      d.controller.call('validateVolumeCapabilities', {
        volumeId: vol.volumeId,
        volumeCapabilities: [mount()],
        parameters,
      });
    const accepted: Record<string, string>[] = [
      { metadataProfile: 'ceph-rbd' },
      { metadataProfile: 'ceph-rbd', objectSize: '2097152' },
      { metadataProfile: 'CEPH-RBD', objectSize: '2Mi' },
    ];
    for (const parameters of accepted) {
      expect((await validate(parameters)).confirmed?.parameters, JSON.stringify(parameters)).toEqual(parameters);
    }
    const refused: [Record<string, string>, RegExp][] = [
      [{ metadataProfile: 'hostpath' }, /metadataProfile is ceph-rbd, not hostpath/],
      [{ metadataProfile: 'ceph-rbd', objectSize: '4Mi' }, /objectSize is 2097152, not 4194304/],
      [{ metadataProfile: 'hostpath', objectSize: '2Mi' }, /objectSize applies only to metadataProfile ceph-rbd/],
      [{ metadataProfile: 'netapp' }, /metadataProfile "netapp" must be one of exact, hostpath, ceph-rbd/],
    ];
    for (const [parameters, message] of refused) {
      const res = await validate(parameters);
      expect(res.confirmed, JSON.stringify(parameters)).toBeUndefined();
      expect(res.message).toMatch(message);
    }
    // The volume's own volume_context (now with its profile) is confirmed as it is.
    const ctx = await d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [mount()],
      volumeContext: vol.volumeContext,
    });
    expect(ctx.confirmed?.volumeContext).toEqual(vol.volumeContext);
  });

  test('ValidateVolumeCapabilities: a malformed capability (no access type) is INVALID_ARGUMENT', async () => {
    const vol = await createVolume();
    const call = d.controller.call('validateVolumeCapabilities', {
      volumeId: vol.volumeId,
      volumeCapabilities: [{ accessMode: { mode: Mode.SINGLE_NODE_WRITER } }],
    });
    expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
  });
});

describe('ListVolumes', () => {
  test('ListVolumes: a negative max_entries is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('listVolumes', { maxEntries: -1 }))).toBe(status.INVALID_ARGUMENT);
  });

  test('ListVolumes: a starting_token this plugin did not issue is ABORTED', async () => {
    const own = await ownDriver();
    await createVolume({}, own);
    await createVolume({}, own);
    const first = await own.controller.call('listVolumes', { maxEntries: 1 });
    expect(first.nextToken).not.toBe('');
    const snapshotShaped = first.nextToken.replace(/vol-/, 'snap-');
    for (const startingToken of [
      'garbage',
      '12',
      '../../etc',
      `${first.nextToken}x`,
      snapshotShaped,
      '-1.vol-0123456789abcdef',
    ]) {
      expect(await codeOf(own.controller.call('listVolumes', { startingToken })), startingToken).toBe(status.ABORTED);
    }
  });

  test('ListVolumes: without max_entries every volume is returned and next_token is empty', async () => {
    const own = await ownDriver();
    const made = [];
    for (let i = 0; i < 5; i++) made.push((await createVolume({}, own)).volumeId);
    const res = await own.controller.call('listVolumes', {});
    expect(res.entries.map((e) => e.volume!.volumeId).sort()).toEqual([...made].sort());
    expect(res.nextToken).toBe('');
  });

  test('ListVolumes: paging with max_entries returns each volume exactly once, no page longer than max_entries, and an empty next_token at the end', async () => {
    const own = await ownDriver();
    const made = [];
    for (let i = 0; i < 7; i++) made.push((await createVolume({}, own)).volumeId);
    for (const max of [1, 2, 3, 7, 8]) {
      const pages = await pagesOfVolumes(own, max);
      for (const page of pages) expect(page.length).toBeLessThanOrEqual(max);
      expect(pages.flat().sort()).toEqual([...made].sort());
      expect(pages.length).toBe(Math.max(1, Math.ceil(made.length / max)));
    }
  });

  test('ListVolumes: when there are more entries than max_entries, next_token is set', async () => {
    const own = await ownDriver();
    for (let i = 0; i < 3; i++) await createVolume({}, own);
    const res = await own.controller.call('listVolumes', { maxEntries: 2 });
    expect(res.entries.length).toBe(2);
    expect(res.nextToken).not.toBe('');
  });

  test('ListVolumes: a token stays valid when the last volume of its page is deleted, and volumes created meanwhile appear on later pages', async () => {
    const own = await ownDriver();
    const made = [];
    for (let i = 0; i < 4; i++) made.push((await createVolume({}, own)).volumeId);
    const first = await own.controller.call('listVolumes', { maxEntries: 2 });
    const firstIds = first.entries.map((e) => e.volume!.volumeId);
    await own.controller.call('deleteVolume', { volumeId: firstIds[1]! });
    const added = (await createVolume({}, own)).volumeId;
    const rest: string[] = [];
    let token = first.nextToken;
    while (token) {
      const res = await own.controller.call('listVolumes', { maxEntries: 2, startingToken: token });
      rest.push(...res.entries.map((e) => e.volume!.volumeId));
      token = res.nextToken;
    }
    const expected = made.filter((id) => !firstIds.includes(id)).concat(added);
    expect(rest.sort()).toEqual(expected.sort());
  });

  test('ListVolumes: entries carry the volume as CreateVolume returned it, and a volume_condition (VOLUME_CONDITION is advertised)', async () => {
    const own = await ownDriver();
    const vol = await createVolume({ parameters: { metadataStyle: 'FIXED' } }, own);
    const res = await own.controller.call('listVolumes', {});
    expect(res.entries.length).toBe(1);
    expect(res.entries[0]!.volume).toEqual(vol);
    expect(res.entries[0]!.status?.volumeCondition).toMatchObject({ abnormal: false });
  });
});

describe('ControllerGetVolume', () => {
  test('ControllerGetVolume: a missing volume_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('controllerGetVolume', {}))).toBe(status.INVALID_ARGUMENT);
  });

  test('ControllerGetVolume: a volume that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const volumeId of ['vol-0123456789abcdef', '../../../../tmp']) {
      expect(await codeOf(d.controller.call('controllerGetVolume', { volumeId }))).toBe(status.NOT_FOUND);
    }
  });

  test('ControllerGetVolume: returns the volume as CreateVolume did, with a non-empty volume_condition', async () => {
    const vol = await createVolume({
      volumeContentSource: undefined,
      parameters: { blockSize: '32Ki' },
      capacityRange: { requiredBytes: 3n * BigInt(MiB) },
    });
    const res = await d.controller.call('controllerGetVolume', { volumeId: vol.volumeId });
    expect(res.volume).toEqual(vol);
    expect(res.status?.volumeCondition?.abnormal).toBe(false);
    expect(res.status?.volumeCondition?.message).not.toBe('');
  });

  test('ControllerGetVolume: reports the current capacity after an expansion', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    await d.controller.call('controllerExpandVolume', {
      volumeId: vol.volumeId,
      capacityRange: { requiredBytes: 2n * BigInt(MiB) },
    });
    const res = await d.controller.call('controllerGetVolume', { volumeId: vol.volumeId });
    expect(res.volume?.capacityBytes).toBe(2n * BigInt(MiB));
  });
});

describe('GetCapacity', () => {
  test('GetCapacity: with a configured capacity, available_capacity is that capacity minus what volumes provision', async () => {
    const limit = 64 * MiB;
    const own = await ownDriver({ capacityBytes: limit });
    expect((await own.controller.call('getCapacity', {})).availableCapacity).toBe(BigInt(limit));
    const sizes = [4 * MiB, 12 * MiB + BLOCK];
    for (const size of sizes) await createVolume({ capacityRange: { requiredBytes: BigInt(size) } }, own);
    const used = sizes.reduce((a, b) => a + b, 0);
    expect((await own.controller.call('getCapacity', {})).availableCapacity).toBe(BigInt(limit - used));
  });

  test('GetCapacity: a volume of exactly the available capacity can be created; one block more is RESOURCE_EXHAUSTED', async () => {
    const own = await ownDriver({ capacityBytes: 32 * MiB });
    await createVolume({ capacityRange: { requiredBytes: BigInt(8 * MiB) } }, own);
    const available = (await own.controller.call('getCapacity', {})).availableCapacity;
    const tooMuch = own.controller.call('createVolume', {
      name: 'too-much',
      volumeCapabilities: [mount()],
      capacityRange: { requiredBytes: available + BigInt(BLOCK) },
    });
    expect(await codeOf(tooMuch)).toBe(status.RESOURCE_EXHAUSTED);
    const exact = await createVolume({ capacityRange: { requiredBytes: available } }, own);
    expect(exact.capacityBytes).toBe(available);
    expect((await own.controller.call('getCapacity', {})).availableCapacity).toBe(0n);
  });

  test("GetCapacity: without a configured capacity, available_capacity is the free space of the state directory's filesystem", async () => {
    const res = await d.controller.call('getCapacity', {});
    const stats = fs.statfsSync(d.driver.store.dir);
    const free = stats.bavail * stats.bsize;
    // Other tests write meanwhile: allow some drift, but it must be this filesystem's free space.
    expect(Math.abs(Number(res.availableCapacity) - free)).toBeLessThan(256 * MiB);
    expect(Number(res.availableCapacity) % BLOCK).toBe(0);
  });

  test("GetCapacity: minimum_volume_size is one block and maximum_volume_size is 2^32 blocks of the requested block size, or fewer where the state filesystem's largest file is smaller", async () => {
    for (const blockSize of [4096, 65536, 1048576]) {
      const res = await d.controller.call('getCapacity', { parameters: { blockSize: String(blockSize) } });
      expect(res.minimumVolumeSize).toBe(BigInt(blockSize));
      expect(res.maximumVolumeSize).toBe(BigInt(largestVolumeBytes(d.driver.store.dir, blockSize)));
    }
  });

  test('GetCapacity: with a configured capacity, maximum_volume_size is no more than the available capacity', async () => {
    const own = await ownDriver({ capacityBytes: 16 * MiB });
    const res = await own.controller.call('getCapacity', {});
    expect(res.maximumVolumeSize).toBe(res.availableCapacity);
  });

  test('GetCapacity: capabilities this driver cannot provision (MULTI_NODE_*, other filesystems) have zero capacity', async () => {
    for (const caps of [[block(Mode.MULTI_NODE_MULTI_WRITER)], [mount(Mode.SINGLE_NODE_WRITER, 'btrfs')]]) {
      const res = await d.controller.call('getCapacity', { volumeCapabilities: caps });
      expect(res.availableCapacity).toBe(0n);
    }
  });

  test('GetCapacity: supported capabilities have the same capacity as none', async () => {
    const own = await ownDriver({ capacityBytes: 8 * MiB });
    const plain = await own.controller.call('getCapacity', {});
    const withCaps = await own.controller.call('getCapacity', { volumeCapabilities: [block(), mount()] });
    expect(withCaps.availableCapacity).toBe(plain.availableCapacity);
    expect(plain.availableCapacity).toBe(BigInt(8 * MiB));
  });

  test("GetCapacity: a topology that is not this node has zero capacity; this node's has the full capacity", async () => {
    const own = await ownDriver({ capacityBytes: 8 * MiB });
    expect(
      (await own.controller.call('getCapacity', { accessibleTopology: thisNode('other') })).availableCapacity,
    ).toBe(0n);
    expect((await own.controller.call('getCapacity', { accessibleTopology: thisNode() })).availableCapacity).toBe(
      BigInt(8 * MiB),
    );
  });

  test('GetCapacity: an invalid parameter or a malformed capability is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('getCapacity', { parameters: { speed: 'fast' } }))).toBe(
      status.INVALID_ARGUMENT,
    );
    expect(
      await codeOf(
        d.controller.call('getCapacity', { volumeCapabilities: [{ accessType: { case: 'block', value: {} } }] }),
      ),
    ).toBe(status.INVALID_ARGUMENT);
  });
});

describe('CreateSnapshot', () => {
  test('CreateSnapshot: a missing source_volume_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('createSnapshot', { name: uniq('s') }))).toBe(status.INVALID_ARGUMENT);
  });

  test('CreateSnapshot: a missing name is INVALID_ARGUMENT', async () => {
    const vol = await createVolume();
    expect(await codeOf(d.controller.call('createSnapshot', { sourceVolumeId: vol.volumeId }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('CreateSnapshot: a name with a banned control character is INVALID_ARGUMENT', async () => {
    const vol = await createVolume();
    expect(await codeOf(d.controller.call('createSnapshot', { sourceVolumeId: vol.volumeId, name: 'a\u0001b' }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('CreateSnapshot: a source volume that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const sourceVolumeId of ['vol-0123456789abcdef', '../../etc']) {
      expect(await codeOf(d.controller.call('createSnapshot', { sourceVolumeId, name: uniq('s') }))).toBe(
        status.NOT_FOUND,
      );
    }
  });

  test('CreateSnapshot: an unknown parameter is INVALID_ARGUMENT; snapshotter-added csi.storage.k8s.io/* keys are accepted', async () => {
    const vol = await createVolume();
    const bad = d.controller.call('createSnapshot', {
      sourceVolumeId: vol.volumeId,
      name: uniq('s'),
      parameters: { retain: 'yes' },
    });
    expect(await codeOf(bad)).toBe(status.INVALID_ARGUMENT);
    const ok = await d.controller.call('createSnapshot', {
      sourceVolumeId: vol.volumeId,
      name: uniq('s'),
      parameters: { 'csi.storage.k8s.io/volumesnapshot/name': 'snap-1' },
    });
    expect(ok.snapshot?.snapshotId).toMatch(/^snap-[0-9a-f]{16}$/);
  });

  test('CreateSnapshot: the snapshot is ready_to_use, names its source, is sized as the volume, has no group, and creation_time is when it was cut', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: 5n * BigInt(MiB) } });
    const before = Date.now();
    const snap = await createSnapshot(vol.volumeId);
    const after = Date.now();
    expect(snap.readyToUse).toBe(true);
    expect(snap.sourceVolumeId).toBe(vol.volumeId);
    expect(snap.sizeBytes).toBe(vol.capacityBytes);
    expect(snap.groupSnapshotId).toBe('');
    const created = timestampMs(snap.creationTime!);
    expect(created).toBeGreaterThanOrEqual(before);
    expect(created).toBeLessThanOrEqual(after);
  });

  test('CreateSnapshot: the same name and source return the same snapshot', async () => {
    const vol = await createVolume();
    const name = uniq('same');
    const a = await createSnapshot(vol.volumeId, name);
    const b = await createSnapshot(vol.volumeId, name);
    expect(b).toEqual(a);
  });

  test('CreateSnapshot: a name already used for another source volume is ALREADY_EXISTS', async () => {
    const v1 = await createVolume();
    const v2 = await createVolume();
    const name = uniq('taken');
    await createSnapshot(v1.volumeId, name);
    expect(await codeOf(d.controller.call('createSnapshot', { sourceVolumeId: v2.volumeId, name }))).toBe(
      status.ALREADY_EXISTS,
    );
  });

  test('CreateSnapshot: a retry succeeds with the same snapshot after its source volume was deleted', async () => {
    const vol = await createVolume();
    const name = uniq('retry');
    const a = await createSnapshot(vol.volumeId, name);
    await d.controller.call('deleteVolume', { volumeId: vol.volumeId });
    const b = await createSnapshot(vol.volumeId, name);
    expect(b.snapshotId).toBe(a.snapshotId);
  });

  test('CreateSnapshot: 10 concurrent calls with the same name make exactly one snapshot', async () => {
    const vol = await createVolume();
    const name = uniq('concurrent-snap');
    const snaps = await Promise.all(Array.from({ length: 10 }, () => createSnapshot(vol.volumeId, name)));
    expect(new Set(snaps.map((s) => s.snapshotId)).size).toBe(1);
    const listed = await d.controller.call('listSnapshots', { sourceVolumeId: vol.volumeId });
    expect(listed.entries.length).toBe(1);
  });

  test("CreateSnapshot: the snapshot keeps its volume's metadata style (for the SnapshotMetadata service)", async () => {
    for (const style of ['FIXED', 'VARIABLE']) {
      const vol = await createVolume({ parameters: { metadataStyle: style } });
      const snap = await createSnapshot(vol.volumeId);
      expect(d.driver.store.getSnapshot(snap.snapshotId).attributes[ATTR_METADATA_STYLE]).toBe(style);
    }
  });

  test("CreateSnapshot: the snapshot holds the volume's data at the time of the cut, not later writes", async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    const before = Buffer.alloc(BLOCK, 1);
    d.driver.store.write(vol.volumeId, 0, before);
    const snap = await createSnapshot(vol.volumeId);
    d.driver.store.write(vol.volumeId, 0, Buffer.alloc(BLOCK, 2));
    expect(d.driver.store.readSnapshot(snap.snapshotId, 0, BLOCK)).toEqual(before);
  });
});

describe('DeleteSnapshot', () => {
  test('DeleteSnapshot: a missing snapshot_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('deleteSnapshot', {}))).toBe(status.INVALID_ARGUMENT);
  });

  test('DeleteSnapshot: a snapshot that does not exist (or was already deleted) is OK', async () => {
    const vol = await createVolume();
    const snap = await createSnapshot(vol.volumeId);
    await d.controller.call('deleteSnapshot', { snapshotId: snap.snapshotId });
    for (const snapshotId of [snap.snapshotId, 'snap-ffffffffffffffff', '../../layers/1.layer', vol.volumeId]) {
      expect(await codeOf(d.controller.call('deleteSnapshot', { snapshotId }))).toBe(status.OK);
    }
  });

  test('DeleteSnapshot: the snapshot is gone afterwards (GetSnapshot NOT_FOUND, ListSnapshots empty) and its volume is untouched', async () => {
    const vol = await createVolume();
    const snap = await createSnapshot(vol.volumeId);
    await d.controller.call('deleteSnapshot', { snapshotId: snap.snapshotId });
    expect(await codeOf(d.controller.call('getSnapshot', { snapshotId: snap.snapshotId }))).toBe(status.NOT_FOUND);
    expect((await d.controller.call('listSnapshots', { snapshotId: snap.snapshotId })).entries).toEqual([]);
    expect((await d.controller.call('controllerGetVolume', { volumeId: vol.volumeId })).volume).toEqual(vol);
  });

  test('DeleteSnapshot: a volume restored from the snapshot keeps its data after the snapshot is deleted', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    const data = Buffer.alloc(BLOCK, 0x42);
    d.driver.store.write(vol.volumeId, BLOCK, data);
    const snap = await createSnapshot(vol.volumeId);
    const restored = await createVolume({
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: snap.snapshotId } } },
    });
    await d.controller.call('deleteSnapshot', { snapshotId: snap.snapshotId });
    await d.driver.store.compact();
    expect(d.driver.store.read(restored.volumeId, BLOCK, BLOCK)).toEqual(data);
  });
});

describe('ListSnapshots', () => {
  test('ListSnapshots: a negative max_entries is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('listSnapshots', { maxEntries: -5 }))).toBe(status.INVALID_ARGUMENT);
  });

  test('ListSnapshots: a starting_token this plugin did not issue is ABORTED', async () => {
    const own = await ownDriver();
    const vol = await createVolume({}, own);
    await createSnapshot(vol.volumeId, 'a', own);
    await createSnapshot(vol.volumeId, 'b', own);
    const first = await own.controller.call('listSnapshots', { maxEntries: 1 });
    expect(first.nextToken).not.toBe('');
    for (const startingToken of ['nope', first.nextToken.replace('snap-', 'vol-'), `x${first.nextToken}`]) {
      expect(await codeOf(own.controller.call('listSnapshots', { startingToken })), startingToken).toBe(status.ABORTED);
    }
  });

  test('ListSnapshots: by snapshot_id returns exactly that snapshot', async () => {
    const vol = await createVolume();
    const s1 = await createSnapshot(vol.volumeId);
    await createSnapshot(vol.volumeId);
    const res = await d.controller.call('listSnapshots', { snapshotId: s1.snapshotId });
    expect(res.entries.map((e) => e.snapshot)).toEqual([s1]);
    expect(res.nextToken).toBe('');
  });

  test('ListSnapshots: a snapshot_id that does not exist (well-formed or not) gives an empty list, not an error', async () => {
    for (const snapshotId of ['snap-0123456789abcdef', '../x', 'vol-0123456789abcdef']) {
      const res = await d.controller.call('listSnapshots', { snapshotId });
      expect(res.entries).toEqual([]);
    }
  });

  test("ListSnapshots: by source_volume_id returns that volume's snapshots only", async () => {
    const v1 = await createVolume();
    const v2 = await createVolume();
    const mine = [await createSnapshot(v1.volumeId), await createSnapshot(v1.volumeId)];
    await createSnapshot(v2.volumeId);
    const res = await d.controller.call('listSnapshots', { sourceVolumeId: v1.volumeId });
    expect(res.entries.map((e) => e.snapshot!.snapshotId).sort()).toEqual(mine.map((s) => s.snapshotId).sort());
  });

  test('ListSnapshots: a source_volume_id with no snapshots (or unknown) gives an empty list', async () => {
    const vol = await createVolume();
    for (const sourceVolumeId of [vol.volumeId, 'vol-0123456789abcdef', 'rubbish']) {
      expect((await d.controller.call('listSnapshots', { sourceVolumeId })).entries).toEqual([]);
    }
  });

  test('ListSnapshots: snapshot_id and source_volume_id together must both match', async () => {
    const v1 = await createVolume();
    const v2 = await createVolume();
    const s1 = await createSnapshot(v1.volumeId);
    expect(
      (await d.controller.call('listSnapshots', { snapshotId: s1.snapshotId, sourceVolumeId: v2.volumeId })).entries,
    ).toEqual([]);
    expect(
      (await d.controller.call('listSnapshots', { snapshotId: s1.snapshotId, sourceVolumeId: v1.volumeId })).entries
        .length,
    ).toBe(1);
  });

  test('ListSnapshots: paging with max_entries returns each snapshot exactly once and ends with an empty next_token', async () => {
    const own = await ownDriver();
    const vol = await createVolume({}, own);
    const made: string[] = [];
    for (let i = 0; i < 5; i++) made.push((await createSnapshot(vol.volumeId, `p${i}`, own)).snapshotId);
    for (const max of [1, 2, 5, 6]) {
      const seen: string[] = [];
      let token = '';
      let pages = 0;
      do {
        const res = await own.controller.call('listSnapshots', { maxEntries: max, startingToken: token });
        expect(res.entries.length).toBeLessThanOrEqual(max);
        seen.push(...res.entries.map((e) => e.snapshot!.snapshotId));
        token = res.nextToken;
        pages++;
      } while (token);
      expect(seen.sort()).toEqual([...made].sort());
      expect(pages).toBe(Math.max(1, Math.ceil(made.length / max)));
    }
  });

  test('ListSnapshots: a token stays valid when the last snapshot of its page is deleted', async () => {
    const own = await ownDriver();
    const vol = await createVolume({}, own);
    const made: string[] = [];
    for (let i = 0; i < 4; i++) made.push((await createSnapshot(vol.volumeId, `t${i}`, own)).snapshotId);
    const first = await own.controller.call('listSnapshots', { maxEntries: 2 });
    const firstIds = first.entries.map((e) => e.snapshot!.snapshotId);
    await own.controller.call('deleteSnapshot', { snapshotId: firstIds[1]! });
    const res = await own.controller.call('listSnapshots', { startingToken: first.nextToken });
    expect(res.entries.map((e) => e.snapshot!.snapshotId).sort()).toEqual(
      made.filter((id) => !firstIds.includes(id)).sort(),
    );
  });
});

describe('GetSnapshot', () => {
  test('GetSnapshot: a missing snapshot_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('getSnapshot', {}))).toBe(status.INVALID_ARGUMENT);
  });

  test('GetSnapshot: a snapshot that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const snapshotId of ['snap-0123456789abcdef', '..']) {
      expect(await codeOf(d.controller.call('getSnapshot', { snapshotId }))).toBe(status.NOT_FOUND);
    }
  });

  test('GetSnapshot: returns the snapshot as CreateSnapshot did', async () => {
    const vol = await createVolume();
    const snap = await createSnapshot(vol.volumeId);
    expect((await d.controller.call('getSnapshot', { snapshotId: snap.snapshotId })).snapshot).toEqual(snap);
  });
});

describe('ControllerExpandVolume', () => {
  test('ControllerExpandVolume: a missing volume_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(d.controller.call('controllerExpandVolume', { capacityRange: { requiredBytes: 1n } }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('ControllerExpandVolume: a missing (or empty) capacity_range is INVALID_ARGUMENT', async () => {
    const vol = await createVolume();
    expect(await codeOf(d.controller.call('controllerExpandVolume', { volumeId: vol.volumeId }))).toBe(
      status.INVALID_ARGUMENT,
    );
    expect(
      await codeOf(d.controller.call('controllerExpandVolume', { volumeId: vol.volumeId, capacityRange: {} })),
    ).toBe(status.INVALID_ARGUMENT);
  });

  test('ControllerExpandVolume: a negative or inverted capacity_range is INVALID_ARGUMENT', async () => {
    const vol = await createVolume();
    for (const capacityRange of [{ requiredBytes: -1n }, { requiredBytes: 8192n, limitBytes: 4096n }]) {
      expect(await codeOf(d.controller.call('controllerExpandVolume', { volumeId: vol.volumeId, capacityRange }))).toBe(
        status.INVALID_ARGUMENT,
      );
    }
  });

  test('ControllerExpandVolume: a volume that does not exist is NOT_FOUND (well-formed or not)', async () => {
    for (const volumeId of ['vol-0123456789abcdef', '../../etc']) {
      expect(
        await codeOf(
          d.controller.call('controllerExpandVolume', { volumeId, capacityRange: { requiredBytes: BigInt(GiB) } }),
        ),
      ).toBe(status.NOT_FOUND);
    }
  });

  test('ControllerExpandVolume: grows the volume to required_bytes rounded up to its block size', async () => {
    const blockSize = 64 * KiB;
    const vol = await createVolume({
      capacityRange: { requiredBytes: BigInt(MiB) },
      parameters: { blockSize: String(blockSize) },
    });
    const required = 3 * MiB + 1;
    const res = await d.controller.call('controllerExpandVolume', {
      volumeId: vol.volumeId,
      capacityRange: { requiredBytes: BigInt(required) },
    });
    const expected = Math.ceil(required / blockSize) * blockSize;
    expect(res.capacityBytes).toBe(BigInt(expected));
    expect(d.driver.store.getVolume(vol.volumeId).capacityBytes).toBe(expected);
  });

  test('ControllerExpandVolume: a volume already at least as large is OK with its current size (retries, and no shrinking)', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: 4n * BigInt(MiB) } });
    for (const requiredBytes of [4n * BigInt(MiB), BigInt(MiB)]) {
      const res = await d.controller.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes },
      });
      expect(res.capacityBytes).toBe(vol.capacityBytes);
    }
    expect(BigInt(d.driver.store.getVolume(vol.volumeId).capacityBytes)).toBe(vol.capacityBytes);
  });

  test('ControllerExpandVolume: node_expansion_required is true for block and mount access (or when not told): the node must refresh the loop devices (issue 15 item 7)', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    let size = BigInt(MiB);
    const expand = async (volumeCapability?: CapabilityInit) => {
      size += BigInt(MiB);
      return d.controller.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes: size },
        ...(volumeCapability ? { volumeCapability } : {}),
      });
    };
    expect((await expand(block())).nodeExpansionRequired).toBe(true);
    expect((await expand(mount())).nodeExpansionRequired).toBe(true);
    expect((await expand()).nodeExpansionRequired).toBe(true);
  });

  test('ControllerExpandVolume: a volume_capability the driver does not support is INVALID_ARGUMENT (exceeds capabilities)', async () => {
    const vol = await createVolume();
    const call = d.controller.call('controllerExpandVolume', {
      volumeId: vol.volumeId,
      capacityRange: { requiredBytes: 2n * BigInt(GiB) },
      volumeCapability: mount(Mode.MULTI_NODE_MULTI_WRITER),
    });
    expect(await codeOf(call)).toBe(status.INVALID_ARGUMENT);
    expect(BigInt(d.driver.store.getVolume(vol.volumeId).capacityBytes)).toBe(vol.capacityBytes);
  });

  test('ControllerExpandVolume: a range no whole number of blocks fits in, or beyond 2^32 blocks, is OUT_OF_RANGE', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    for (const capacityRange of [
      { requiredBytes: BigInt(2 * MiB + 1), limitBytes: BigInt(2 * MiB + 100) },
      { requiredBytes: BigInt(MAX_BLOCKS) * BigInt(BLOCK) + 1n },
    ]) {
      expect(await codeOf(d.controller.call('controllerExpandVolume', { volumeId: vol.volumeId, capacityRange }))).toBe(
        status.OUT_OF_RANGE,
      );
    }
    expect(BigInt(d.driver.store.getVolume(vol.volumeId).capacityBytes)).toBe(vol.capacityBytes);
  });

  test('ControllerExpandVolume: growing past the configured capacity is RESOURCE_EXHAUSTED', async () => {
    const own = await ownDriver({ capacityBytes: 16 * MiB });
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(8 * MiB) } }, own);
    const call = own.controller.call('controllerExpandVolume', {
      volumeId: vol.volumeId,
      capacityRange: { requiredBytes: BigInt(16 * MiB + BLOCK) },
    });
    expect(await codeOf(call)).toBe(status.RESOURCE_EXHAUSTED);
    const ok = await own.controller.call('controllerExpandVolume', {
      volumeId: vol.volumeId,
      capacityRange: { requiredBytes: BigInt(16 * MiB) },
    });
    expect(ok.capacityBytes).toBe(BigInt(16 * MiB));
  });

  test('ControllerExpandVolume: data written before the expansion is still there after it', async () => {
    const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } });
    const data = Buffer.alloc(BLOCK, 0x77);
    d.driver.store.write(vol.volumeId, MiB - BLOCK, data);
    await d.controller.call('controllerExpandVolume', {
      volumeId: vol.volumeId,
      capacityRange: { requiredBytes: 2n * BigInt(MiB) },
    });
    expect(d.driver.store.read(vol.volumeId, MiB - BLOCK, BLOCK)).toEqual(data);
    expect(d.driver.store.read(vol.volumeId, MiB, BLOCK)).toEqual(Buffer.alloc(BLOCK));
  });
});

describe('RPCs this controller does not implement', () => {
  test('ControllerPublishVolume and ControllerUnpublishVolume answer UNIMPLEMENTED (12)', async () => {
    const vol = await createVolume();
    expect(
      await codeOf(
        d.controller.call('controllerPublishVolume', {
          volumeId: vol.volumeId,
          nodeId: 'test-node',
          volumeCapability: mount(),
        }),
      ),
    ).toBe(status.UNIMPLEMENTED);
    expect(
      await codeOf(d.controller.call('controllerUnpublishVolume', { volumeId: vol.volumeId, nodeId: 'test-node' })),
    ).toBe(status.UNIMPLEMENTED);
  });
});

describe('Rejected requests', () => {
  test('Controller: requests that fail change nothing in the store (volumes, snapshots, layers, provisioned bytes)', async () => {
    const own = await ownDriver({ capacityBytes: 64 * MiB });
    const vol = await createVolume({ name: 'keep', capacityRange: { requiredBytes: BigInt(8 * MiB) } }, own);
    own.driver.store.write(vol.volumeId, 0, Buffer.alloc(BLOCK, 9));
    const snap = await createSnapshot(vol.volumeId, 'keep-snap', own);
    const state = async () => ({
      volumes: (await own.controller.call('listVolumes', {})).entries.map((e) => e.volume),
      snapshots: (await own.controller.call('listSnapshots', {})).entries.map((e) => e.snapshot),
      space: (({ volumes, snapshots, layers, provisionedBytes }) => ({ volumes, snapshots, layers, provisionedBytes }))(
        own.driver.store.spaceUsage(),
      ),
    });
    const before = await state();
    const c = own.controller;
    const snapSource = { type: { case: 'snapshot' as const, value: { snapshotId: snap.snapshotId } } };
    const bad: Promise<unknown>[] = [
      c.call('createVolume', { volumeCapabilities: [mount()] }),
      c.call('createVolume', { name: 'x', volumeCapabilities: [block(Mode.MULTI_NODE_MULTI_WRITER)] }),
      c.call('createVolume', { name: 'x', volumeCapabilities: [mount()], parameters: { nope: '1' } }),
      c.call('createVolume', { name: 'x', volumeCapabilities: [mount()], capacityRange: { requiredBytes: -1n } }),
      c.call('createVolume', {
        name: 'x',
        volumeCapabilities: [mount()],
        capacityRange: { requiredBytes: BigInt(128 * MiB) },
      }),
      c.call('createVolume', { name: 'x', volumeCapabilities: [mount()], capacityRange: { limitBytes: 100n } }),
      c.call('createVolume', {
        name: 'keep',
        volumeCapabilities: [mount()],
        capacityRange: { requiredBytes: BigInt(16 * MiB) },
      }),
      c.call('createVolume', {
        name: 'x',
        volumeCapabilities: [mount()],
        accessibilityRequirements: { requisite: [thisNode('elsewhere')] },
      }),
      c.call('createVolume', {
        name: 'x',
        volumeCapabilities: [mount()],
        volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: 'snap-0000000000000000' } } },
      }),
      c.call('createVolume', {
        name: 'x',
        volumeCapabilities: [mount()],
        capacityRange: { limitBytes: BigInt(MiB) },
        volumeContentSource: snapSource,
      }),
      c.call('createVolume', {
        name: 'x',
        volumeCapabilities: [mount()],
        parameters: { blockSize: '8192' },
        volumeContentSource: snapSource,
      }),
      c.call('deleteVolume', {}),
      c.call('createSnapshot', { sourceVolumeId: vol.volumeId, name: '' }),
      c.call('createSnapshot', { sourceVolumeId: 'vol-0000000000000000', name: 'y' }),
      c.call('createSnapshot', { sourceVolumeId: vol.volumeId, name: 'y', parameters: { bad: '1' } }),
      c.call('deleteSnapshot', {}),
      c.call('controllerExpandVolume', { volumeId: vol.volumeId, capacityRange: { requiredBytes: BigInt(128 * MiB) } }),
      c.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes: BigInt(MAX_BLOCKS) * 8192n },
      }),
      c.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes: BigInt(9 * MiB) },
        volumeCapability: block(Mode.MULTI_NODE_READER_ONLY),
      }),
      c.call('controllerPublishVolume', { volumeId: vol.volumeId, nodeId: 'n' }),
      c.call('controllerModifyVolume', { volumeId: vol.volumeId, mutableParameters: { a: 'b' } }),
      c.call('listVolumes', { startingToken: 'bogus' }),
    ];
    const codes = await Promise.all(bad.map((p) => codeOf(p)));
    for (const [i, code] of codes.entries()) expect(code, `bad request #${i}`).not.toBe(status.OK);
    expect(await state()).toEqual(before);
  });

  test("Controller: IDs that are not this driver's IDs never reach the file system (path-like IDs delete nothing)", async () => {
    const own = await ownDriver();
    const vol = await createVolume({}, own);
    const files = () =>
      fs
        .readdirSync(path.join(own.dir, 'state', 'store'), { recursive: true })
        .map(String)
        .sort();
    // The volume's head and the empty spare the store makes ahead, in the background, for its next layer.
    await vi.waitFor(() => expect(files().filter((f) => f.endsWith('.layer'))).toHaveLength(2));
    const before = files();
    for (const volumeId of ['..', '../store', 'layers', 'catalog.db', `${vol.volumeId}/..`, '/']) {
      expect(await codeOf(own.controller.call('deleteVolume', { volumeId }))).toBe(status.OK);
    }
    for (const snapshotId of ['..', 'layers/1.layer', 'catalog.db']) {
      expect(await codeOf(own.controller.call('deleteSnapshot', { snapshotId }))).toBe(status.OK);
    }
    expect(files()).toEqual(before);
    expect((await listAllVolumes(own)).map((v) => v.volumeId)).toEqual([vol.volumeId]);
  });
});

describe('Secrets', () => {
  test('Controller: secrets in requests are accepted and never written to the logs, even at debug level', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-secrets-'));
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(chunk.toString());
        done();
      },
    });
    const config = testConfig(dir, { logLevel: 'debug' });
    const driver = await startDriver(config, createLogger('debug', sink));
    const client = new ServiceClient(
      Controller,
      `unix://${config.endpoint.kind === 'unix' ? config.endpoint.path : ''}`,
    );
    const secret = 'hunter2-do-not-log-me';
    const secrets = { password: secret, 'api-token': secret };
    try {
      const vol = (await client.call('createVolume', { name: 'secret-vol', volumeCapabilities: [mount()], secrets }))
        .volume!;
      const snap = (await client.call('createSnapshot', { sourceVolumeId: vol.volumeId, name: 'secret-snap', secrets }))
        .snapshot!;
      await client.call('listSnapshots', { secrets });
      await client.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes: 2n * GiB_n },
        secrets,
      });
      await client.call('validateVolumeCapabilities', {
        volumeId: vol.volumeId,
        volumeCapabilities: [mount()],
        secrets,
      });
      await client.call('deleteSnapshot', { snapshotId: snap.snapshotId, secrets });
      await client.call('deleteVolume', { volumeId: vol.volumeId, secrets });
      // A failing call logs too.
      await codeOf(client.call('createVolume', { name: 'secret-bad', volumeCapabilities: [], secrets }));
    } finally {
      client.close();
      await driver.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
    const log = lines.join('');
    // The requests were logged (so this test can fail), with their secrets blanked out.
    expect(log).toContain('rpc request');
    expect(log).toContain('secret-vol');
    expect(log).not.toContain(secret);
  });
});

smallFileSystemSuite(
  'volume sizes on a small state filesystem (ext4 with 1 KiB blocks: largest file 4 TiB - 1 KiB)',
  () => {
    let small: SmallFileSystem;
    let own: TestDriver;
    beforeAll(async () => {
      small = mountSmallExt4({ sizeBytes: 64 * MiB, blockSize: 1024 });
      own = await startTestDriver({ stateDir: path.join(small.dir, 'state') });
    });
    afterAll(async () => {
      await own?.stop();
      small?.remove();
    });
    const TiB = 1024 * GiB;
    const maximumVolumeSize = async (): Promise<bigint> => {
      const max = (await own.controller.call('getCapacity', {})).maximumVolumeSize;
      expect(max).toBeDefined();
      return max!;
    };

    test('GetCapacity: maximum_volume_size is what the filesystem can hold in one file, in whole blocks (4 TiB - 4 KiB at 4 KiB, 4 TiB - 1 MiB at 1 MiB), not 2^32 blocks', async () => {
      const at4k = await own.controller.call('getCapacity', { parameters: { blockSize: '4096' } });
      expect(at4k.maximumVolumeSize).toBe(BigInt(4 * TiB - 4 * KiB));
      const at1m = await own.controller.call('getCapacity', { parameters: { blockSize: '1Mi' } });
      expect(at1m.maximumVolumeSize).toBe(BigInt(4 * TiB - MiB));
    });

    test("GetCapacity: available_capacity is the free space of the state directory's filesystem", async () => {
      const stats = fs.statfsSync(small.dir);
      const res = await own.controller.call('getCapacity', {});
      expect(res.availableCapacity).toBe(BigInt(Math.floor((stats.bavail * stats.bsize) / BLOCK) * BLOCK));
    });

    test('CreateVolume: maximum_volume_size is accepted; one block more is OUT_OF_RANGE with a message naming the filesystem', async () => {
      const max = await maximumVolumeSize();
      const vol = await createVolume({ capacityRange: { requiredBytes: max } }, own);
      expect(vol.capacityBytes).toBe(max);
      let message = '';
      const code = await codeOf(
        own.controller
          .call('createVolume', {
            name: 'past-max',
            volumeCapabilities: [block()],
            capacityRange: { requiredBytes: max + BigInt(BLOCK) },
          })
          .catch((err: { details?: string }) => {
            message = err.details ?? '';
            throw err;
          }),
      );
      expect(code).toBe(status.OUT_OF_RANGE);
      expect(message).toContain('ext4');
      expect(own.driver.store.findVolumeByName('past-max')).toBeUndefined();
      await own.controller.call('deleteVolume', { volumeId: vol.volumeId });
    });

    test('ControllerExpandVolume: past what the filesystem holds (4 TiB at 4 KiB blocks) is OUT_OF_RANGE and the volume keeps its size; up to maximum_volume_size is OK', async () => {
      const max = await maximumVolumeSize();
      const vol = await createVolume({ capacityRange: { requiredBytes: BigInt(MiB) } }, own);
      const past = own.controller.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes: BigInt(4 * TiB) },
      });
      expect(await codeOf(past)).toBe(status.OUT_OF_RANGE);
      expect(own.driver.store.getVolume(vol.volumeId).capacityBytes).toBe(MiB);
      const ok = await own.controller.call('controllerExpandVolume', {
        volumeId: vol.volumeId,
        capacityRange: { requiredBytes: max },
      });
      expect(ok.capacityBytes).toBe(max);
    });
  },
);
