/** CSI Identity: who the plugin is, what it offers, and whether it is ready. */
import { create } from '@bufbuild/protobuf';
import type { ServiceImpl } from '@connectrpc/connect';
import {
  type Identity,
  PluginCapability_Service_Type,
  PluginCapability_VolumeExpansion_Type,
  PluginCapabilitySchema,
} from '../gen/csi/v1/csi_pb.js';
import type { DriverContext } from './driver-context.js';

export function identityService(ctx: DriverContext): ServiceImpl<typeof Identity> {
  return {
    getPluginInfo() {
      return { name: ctx.config.driverName, vendorVersion: ctx.config.version, manifest: {} };
    },
    getPluginCapabilities() {
      const service = (type: PluginCapability_Service_Type) =>
        create(PluginCapabilitySchema, { type: { case: 'service', value: { type } } });
      return {
        capabilities: [
          service(PluginCapability_Service_Type.CONTROLLER_SERVICE),
          service(PluginCapability_Service_Type.VOLUME_ACCESSIBILITY_CONSTRAINTS),
          service(PluginCapability_Service_Type.SNAPSHOT_METADATA_SERVICE),
          service(PluginCapability_Service_Type.GROUP_CONTROLLER_SERVICE),
          create(PluginCapabilitySchema, {
            type: { case: 'volumeExpansion', value: { type: PluginCapability_VolumeExpansion_Type.ONLINE } },
          }),
        ],
      };
    },
    probe() {
      // Ready once the store is open; the server only starts listening after that, and stops before closing it.
      return { ready: ctx.isReady() };
    },
  };
}
