/**
 * CSI GroupController: snapshots of several volumes taken at one point in time (Kubernetes
 * VolumeGroupSnapshot). A thin adapter: the engine freezes every member head in one transaction
 * (invariant 9); members are ordinary snapshots that carry their group's ID and are deleted with it.
 */
import { create } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import { Code, type ServiceImpl } from '@connectrpc/connect';
import { type GroupSnapshotInfo, NotFoundError } from '../../storage-engine/index.js';
import {
  type GroupController,
  GroupControllerServiceCapability_RPC_Type as RpcType,
  GroupControllerServiceCapabilitySchema,
  type VolumeGroupSnapshot,
  VolumeGroupSnapshotSchema,
} from '../gen/csi/v1/csi_pb.js';
import { rpcError } from '../rpc/status.js';
import { snapshotMessage } from './csi-objects.js';
import type { DriverContext } from './driver-context.js';
import { checkName, checkSnapshotParameters, snapshotAttributes } from './snapshot-requests.js';

/** What GroupControllerGetCapabilities advertises; each one is implemented below. */
export const GROUP_CONTROLLER_CAPABILITIES: readonly RpcType[] = [RpcType.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT];

export function groupControllerService(ctx: DriverContext): ServiceImpl<typeof GroupController> {
  const { store, config } = ctx;
  const findVolume = (id: string) => {
    try {
      return store.getVolume(id);
    } catch (err) {
      if (err instanceof NotFoundError) return undefined;
      throw err;
    }
  };

  return {
    groupControllerGetCapabilities() {
      return {
        capabilities: GROUP_CONTROLLER_CAPABILITIES.map((type) =>
          create(GroupControllerServiceCapabilitySchema, { type: { case: 'rpc', value: { type } } }),
        ),
      };
    },

    async createVolumeGroupSnapshot(req) {
      checkName(req.name, 'name');
      if (req.sourceVolumeIds.length === 0) throw rpcError(Code.InvalidArgument, 'source_volume_ids is required');
      if (req.sourceVolumeIds.some((id) => !id))
        throw rpcError(Code.InvalidArgument, 'source_volume_ids has an empty ID');
      checkSnapshotParameters(req.parameters);
      // Same-name groups are the engine's to answer, before it looks for the volumes (a retry after a delete).
      const group = await store.createGroupSnapshot({
        name: req.name,
        members: req.sourceVolumeIds.map((volumeId) => ({
          volumeId,
          attributes: snapshotAttributes(findVolume(volumeId), config),
        })),
      });
      ctx.logger.info(
        { groupSnapshotId: group.id, name: req.name, volumes: req.sourceVolumeIds.length },
        'group snapshot ready',
      );
      return { groupSnapshot: groupMessage(group) };
    },

    async deleteVolumeGroupSnapshot(req) {
      if (!req.groupSnapshotId) throw rpcError(Code.InvalidArgument, 'group_snapshot_id is required');
      let group: GroupSnapshotInfo;
      try {
        group = store.getGroupSnapshot(req.groupSnapshotId);
      } catch (err) {
        // Already gone (or never ours): deleting is idempotent.
        if (err instanceof NotFoundError) return {};
        throw err;
      }
      checkSnapshotIds(req.snapshotIds, group);
      await store.deleteGroupSnapshot(group.id);
      ctx.logger.info({ groupSnapshotId: group.id }, 'group snapshot deleted');
      return {};
    },

    getVolumeGroupSnapshot(req) {
      if (!req.groupSnapshotId) throw rpcError(Code.InvalidArgument, 'group_snapshot_id is required');
      const group = store.getGroupSnapshot(req.groupSnapshotId);
      checkSnapshotIds(req.snapshotIds, group);
      return { groupSnapshot: groupMessage(group) };
    },
  };
}

/** snapshot_ids, when given, must be exactly the group's members (spec: "snapshot list mismatch"). */
function checkSnapshotIds(given: readonly string[], group: GroupSnapshotInfo): void {
  if (given.length === 0) return;
  const members = new Set(group.snapshots.map((s) => s.id));
  const same =
    given.length === members.size && given.every((id) => members.has(id)) && new Set(given).size === given.length;
  if (!same) {
    throw rpcError(Code.InvalidArgument, `snapshot_ids are not the members of group snapshot ${group.id}`);
  }
}

function groupMessage(group: GroupSnapshotInfo): VolumeGroupSnapshot {
  return create(VolumeGroupSnapshotSchema, {
    groupSnapshotId: group.id,
    snapshots: group.snapshots.map(snapshotMessage),
    creationTime: timestampFromMs(group.createdAtMs),
    readyToUse: true,
  });
}
