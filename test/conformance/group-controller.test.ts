/**
 * CSI GroupController conformance (spec: "Group Controller Service RPC"), through an independent grpc-js
 * client. Each test names the rule it checks.
 */
import { status } from '@grpc/grpc-js';
import { timestampMs } from '@bufbuild/protobuf/wkt';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  GroupController,
  GroupControllerServiceCapability_RPC_Type as GroupRpc,
  PluginCapability_Service_Type as PluginService,
  VolumeCapability_AccessMode_Mode as Mode,
} from '../../src/gen/csi/v1/csi_pb.js';
import { codeOf, ServiceClient } from '../support/csi-client.js';
import { startTestDriver, type TestDriver } from '../support/test-driver.js';

let d: TestDriver;
let group: ServiceClient<typeof GroupController>;

beforeAll(async () => {
  d = await startTestDriver();
  group = new ServiceClient(GroupController, d.target);
});
afterAll(async () => {
  group?.close();
  await d?.stop();
});

let seq = 0;
async function volume(): Promise<string> {
  const res = await d.controller.call('createVolume', {
    name: `group-vol-${++seq}`,
    capacityRange: { requiredBytes: 1n << 20n },
    volumeCapabilities: [{ accessType: { case: 'block', value: {} }, accessMode: { mode: Mode.SINGLE_NODE_WRITER } }],
  });
  return res.volume!.volumeId;
}

describe('GroupController', () => {
  test('GetPluginCapabilities advertises GROUP_CONTROLLER_SERVICE, and GroupControllerGetCapabilities CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT', async () => {
    const plugin = await d.identity.call('getPluginCapabilities', {});
    const services = plugin.capabilities.flatMap((c) => (c.type.case === 'service' ? [c.type.value.type] : []));
    expect(services).toContain(PluginService.GROUP_CONTROLLER_SERVICE);
    const caps = await group.call('groupControllerGetCapabilities', {});
    expect(caps.capabilities.map((c) => (c.type.case === 'rpc' ? c.type.value.type : undefined))).toEqual([
      GroupRpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
    ]);
  });

  test('CreateVolumeGroupSnapshot: one member snapshot a volume, each carrying the group ID, ready to use', async () => {
    const vols = [await volume(), await volume(), await volume()];
    const res = await group.call('createVolumeGroupSnapshot', { name: 'g-create', sourceVolumeIds: vols });
    const g = res.groupSnapshot!;
    expect(g.groupSnapshotId).toMatch(/^group-/);
    expect(g.readyToUse).toBe(true);
    expect(timestampMs(g.creationTime!)).toBeGreaterThan(0);
    expect(g.snapshots.map((s) => s.sourceVolumeId).sort()).toEqual([...vols].sort());
    for (const s of g.snapshots) {
      expect(s.groupSnapshotId).toBe(g.groupSnapshotId);
      expect(s.readyToUse).toBe(true);
    }
  });

  test('CreateVolumeGroupSnapshot is idempotent by name: the same volumes return the same group', async () => {
    const vols = [await volume(), await volume()];
    const a = await group.call('createVolumeGroupSnapshot', { name: 'g-idem', sourceVolumeIds: vols });
    const b = await group.call('createVolumeGroupSnapshot', { name: 'g-idem', sourceVolumeIds: [...vols].reverse() });
    expect(b.groupSnapshot!.groupSnapshotId).toBe(a.groupSnapshot!.groupSnapshotId);
    expect(b.groupSnapshot!.snapshots.map((s) => s.snapshotId).sort()).toEqual(
      a.groupSnapshot!.snapshots.map((s) => s.snapshotId).sort(),
    );
  });

  test('CreateVolumeGroupSnapshot: a name in use for other volumes is ALREADY_EXISTS', async () => {
    const [v1, v2, v3] = [await volume(), await volume(), await volume()];
    await group.call('createVolumeGroupSnapshot', { name: 'g-clash', sourceVolumeIds: [v1, v2] });
    expect(await codeOf(group.call('createVolumeGroupSnapshot', { name: 'g-clash', sourceVolumeIds: [v1, v3] }))).toBe(
      status.ALREADY_EXISTS,
    );
  });

  test('CreateVolumeGroupSnapshot: missing name, no volumes, a volume twice or an unknown parameter is INVALID_ARGUMENT; an unknown volume NOT_FOUND', async () => {
    const v = await volume();
    expect(await codeOf(group.call('createVolumeGroupSnapshot', { sourceVolumeIds: [v] }))).toBe(
      status.INVALID_ARGUMENT,
    );
    expect(await codeOf(group.call('createVolumeGroupSnapshot', { name: 'g-none', sourceVolumeIds: [] }))).toBe(
      status.INVALID_ARGUMENT,
    );
    expect(await codeOf(group.call('createVolumeGroupSnapshot', { name: 'g-twice', sourceVolumeIds: [v, v] }))).toBe(
      status.INVALID_ARGUMENT,
    );
    expect(
      await codeOf(
        group.call('createVolumeGroupSnapshot', {
          name: 'g-param',
          sourceVolumeIds: [v],
          parameters: { color: 'red' },
        }),
      ),
    ).toBe(status.INVALID_ARGUMENT);
    expect(
      await codeOf(
        group.call('createVolumeGroupSnapshot', { name: 'g-unknown', sourceVolumeIds: [v, 'vol-0000000000000000'] }),
      ),
    ).toBe(status.NOT_FOUND);
  });

  test('GetVolumeGroupSnapshot returns the group; an unknown ID is NOT_FOUND; snapshot_ids that are not the members are INVALID_ARGUMENT', async () => {
    const vols = [await volume(), await volume()];
    const created = (await group.call('createVolumeGroupSnapshot', { name: 'g-get', sourceVolumeIds: vols }))
      .groupSnapshot!;
    const ids = created.snapshots.map((s) => s.snapshotId);
    const got = await group.call('getVolumeGroupSnapshot', {
      groupSnapshotId: created.groupSnapshotId,
      snapshotIds: ids,
    });
    expect(got.groupSnapshot!.groupSnapshotId).toBe(created.groupSnapshotId);
    expect(await codeOf(group.call('getVolumeGroupSnapshot', { groupSnapshotId: 'group-0000000000000000' }))).toBe(
      status.NOT_FOUND,
    );
    expect(
      await codeOf(
        group.call('getVolumeGroupSnapshot', { groupSnapshotId: created.groupSnapshotId, snapshotIds: [ids[0]!] }),
      ),
    ).toBe(status.INVALID_ARGUMENT);
    expect(await codeOf(group.call('getVolumeGroupSnapshot', {}))).toBe(status.INVALID_ARGUMENT);
  });

  test('DeleteVolumeGroupSnapshot deletes every member; repeating it or an unknown ID is OK; a member alone cannot be deleted', async () => {
    const vols = [await volume(), await volume()];
    const created = (await group.call('createVolumeGroupSnapshot', { name: 'g-del', sourceVolumeIds: vols }))
      .groupSnapshot!;
    const member = created.snapshots[0]!.snapshotId;
    expect(await codeOf(d.controller.call('deleteSnapshot', { snapshotId: member }))).toBe(status.FAILED_PRECONDITION);
    expect(
      await codeOf(
        group.call('deleteVolumeGroupSnapshot', { groupSnapshotId: created.groupSnapshotId, snapshotIds: [member] }),
      ),
    ).toBe(status.INVALID_ARGUMENT);
    await group.call('deleteVolumeGroupSnapshot', { groupSnapshotId: created.groupSnapshotId });
    await group.call('deleteVolumeGroupSnapshot', { groupSnapshotId: created.groupSnapshotId });
    await group.call('deleteVolumeGroupSnapshot', { groupSnapshotId: 'group-0000000000000000' });
    expect(await codeOf(group.call('getVolumeGroupSnapshot', { groupSnapshotId: created.groupSnapshotId }))).toBe(
      status.NOT_FOUND,
    );
    const listed = await d.controller.call('listSnapshots', { snapshotId: member });
    expect(listed.entries).toHaveLength(0);
    expect(await codeOf(group.call('deleteVolumeGroupSnapshot', {}))).toBe(status.INVALID_ARGUMENT);
  });

  test('member snapshots are ordinary snapshots: ListSnapshots shows them with their group ID, and a volume restores from one', async () => {
    const vols = [await volume(), await volume()];
    const created = (await group.call('createVolumeGroupSnapshot', { name: 'g-members', sourceVolumeIds: vols }))
      .groupSnapshot!;
    const member = created.snapshots[1]!;
    const listed = await d.controller.call('listSnapshots', { snapshotId: member.snapshotId });
    expect(listed.entries[0]!.snapshot!.groupSnapshotId).toBe(created.groupSnapshotId);
    const restored = await d.controller.call('createVolume', {
      name: 'g-restore',
      capacityRange: { requiredBytes: 1n << 20n },
      volumeCapabilities: [{ accessType: { case: 'block', value: {} }, accessMode: { mode: Mode.SINGLE_NODE_WRITER } }],
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: member.snapshotId } } },
    });
    expect(restored.volume!.volumeId).toMatch(/^vol-/);
  });
});
