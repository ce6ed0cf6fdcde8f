/**
 * What kubelet does for a CSI driver on its node, done by hand in a headless cluster (there is no
 * kubelet), and nothing more: plugin registration (NodeGetInfo to the Node's labels and annotation and to
 * the CSINode), staging and publishing a Block volume for a pod at kubelet's own paths with the PV's
 * volume attributes (plus the pod's details, as the CSIDriver's podInfoOnMount asks), the node part of an
 * expansion, and the reverse. Every CSI call goes through the driver's Node service on its socket, on an
 * independent gRPC stack (grpc-js), as kubelet's grpc-go does.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  Identity,
  Node,
  NodeServiceCapability_RPC_Type as NodeRpc,
  VolumeCapability_AccessMode_Mode as Mode,
} from '../../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient } from '../../support/csi-client.js';
import type { HeadlessCluster, PluginPod } from './headless-cluster.js';
import type { KubeObject } from './kube-api.js';
import { parseQuantity } from './quantity.js';

/** Node's architecture names as Go (and so the kubernetes.io/arch label) spells them. */
const GOARCH: Partial<Record<NodeJS.Architecture, string>> = { x64: 'amd64', arm64: 'arm64', ia32: '386' };

/** A Block volume as a pod sees it: the device at `targetPath`. */
export interface PublishedBlockVolume {
  pvName: string;
  volumeId: string;
  stagingPath: string;
  /** The device node the pod uses (kubelet's publish path for the pod). */
  targetPath: string;
  capability: { accessType: { case: 'block'; value: Record<string, never> }; accessMode: { mode: Mode } };
}

export class KubeletStandIn {
  private readonly identity: ServiceClient<typeof Identity>;
  readonly node: ServiceClient<typeof Node>;
  private nodeCapabilities: NodeRpc[] = [];

  /** Kubelet of `pod`'s node (default: the cluster's first), talking to that pod's driver. */
  constructor(
    private readonly cluster: HeadlessCluster,
    private readonly pod: PluginPod = cluster.pods[0]!,
  ) {
    this.identity = new ServiceClient(Identity, pod.csiEndpoint);
    this.node = new ServiceClient(Node, pod.csiEndpoint);
  }

  private get kubeletDir(): string {
    return this.cluster.values.kubeletDir as string;
  }

  /**
   * Kubelet's registration of the node and of the plugin (what node-driver-registrar announces): the
   * Node, then NodeGetInfo's topology as Node labels, its node ID in the csi.volume.kubernetes.io/nodeid
   * annotation, and the driver's entry in the CSINode.
   */
  async registerNode(): Promise<{ nodeId: string; topology: Record<string, string> }> {
    const { api } = this.cluster;
    const { nodeName } = this.pod;
    const plugin = await this.identity.call('getPluginInfo', {});
    if (plugin.name !== this.cluster.driverName)
      throw new Error(`the driver calls itself ${plugin.name}, the chart's CSIDriver is ${this.cluster.driverName}`);
    const info = await this.node.call('nodeGetInfo', {});
    this.nodeCapabilities = (await this.node.call('nodeGetCapabilities', {})).capabilities.flatMap((c) =>
      c.type.case === 'rpc' ? [c.type.value.type] : [],
    );
    const topology = info.accessibleTopology?.segments ?? {};
    const node = await api.create('/api/v1/nodes', {
      apiVersion: 'v1',
      kind: 'Node',
      metadata: {
        name: nodeName,
        labels: {
          'kubernetes.io/hostname': nodeName,
          'kubernetes.io/os': 'linux',
          'kubernetes.io/arch': GOARCH[process.arch] ?? process.arch,
        },
      },
    });
    await api.patch(`/api/v1/nodes/${nodeName}`, {
      metadata: {
        labels: topology,
        annotations: { 'csi.volume.kubernetes.io/nodeid': JSON.stringify({ [plugin.name]: info.nodeId }) },
      },
    });
    const maxVolumes = Number(info.maxVolumesPerNode);
    await api.create('/apis/storage.k8s.io/v1/csinodes', {
      apiVersion: 'storage.k8s.io/v1',
      kind: 'CSINode',
      metadata: {
        name: nodeName,
        ownerReferences: [{ apiVersion: 'v1', kind: 'Node', name: nodeName, uid: node.metadata.uid }],
      },
      spec: {
        drivers: [
          {
            name: plugin.name,
            nodeID: info.nodeId,
            topologyKeys: Object.keys(topology).sort(),
            ...(maxVolumes > 0 ? { allocatable: { count: maxVolumes } } : {}),
          },
        ],
      },
    });
    return { nodeId: info.nodeId, topology };
  }

  /** The CSI access mode kubelet sends for a PV's access modes (with SINGLE_NODE_MULTI_WRITER support). */
  private accessMode(pv: KubeObject): Mode {
    const modes = pv.spec.accessModes as string[];
    const multiWriter = this.nodeCapabilities.includes(NodeRpc.SINGLE_NODE_MULTI_WRITER);
    if (modes.includes('ReadWriteOncePod'))
      return multiWriter ? Mode.SINGLE_NODE_SINGLE_WRITER : Mode.SINGLE_NODE_WRITER;
    if (modes.includes('ReadWriteMany')) return Mode.MULTI_NODE_MULTI_WRITER;
    if (modes.includes('ReadOnlyMany')) return Mode.MULTI_NODE_READER_ONLY;
    return multiWriter ? Mode.SINGLE_NODE_MULTI_WRITER : Mode.SINGLE_NODE_WRITER;
  }

  /** Stages and publishes the Block PV of a pod's claim, at kubelet's paths, as kubelet does before starting it. */
  async publishBlockVolume(pod: KubeObject, claimName: string): Promise<PublishedBlockVolume> {
    const { api } = this.cluster;
    const { hostPath } = this.pod;
    const ns = pod.metadata.namespace!;
    if (pod.spec.nodeName !== this.pod.nodeName)
      throw new Error(
        `pod ${ns}/${pod.metadata.name} runs on ${pod.spec.nodeName}, not on this kubelet's ${this.pod.nodeName}`,
      );
    const pvc = await api.get(`/api/v1/namespaces/${ns}/persistentvolumeclaims/${claimName}`);
    const pvName = pvc.spec.volumeName as string;
    if (!pvName || pvc.status?.phase !== 'Bound') throw new Error(`claim ${ns}/${claimName} is not bound`);
    const pv = await api.get(`/api/v1/persistentvolumes/${pvName}`);
    if (pv.spec.volumeMode !== 'Block') throw new Error(`PV ${pvName} is not a Block volume`);
    const csi = pv.spec.csi as { driver: string; volumeHandle: string; volumeAttributes?: Record<string, string> };
    const csiDriver = await api.get(`/apis/storage.k8s.io/v1/csidrivers/${csi.driver}`);
    const base = `${this.kubeletDir}/plugins/kubernetes.io/csi/volumeDevices`;
    const stagingPath = hostPath(`${base}/staging/${pvName}`);
    const targetPath = hostPath(`${base}/publish/${pvName}/${pod.metadata.uid}`);
    fs.mkdirSync(stagingPath, { recursive: true, mode: 0o750 });
    fs.mkdirSync(path.dirname(targetPath), { recursive: true, mode: 0o750 });
    const capability = {
      accessType: { case: 'block' as const, value: {} },
      accessMode: { mode: this.accessMode(pv) },
    };
    const volumeContext = csi.volumeAttributes ?? {};
    await this.node.call('nodeStageVolume', {
      volumeId: csi.volumeHandle,
      stagingTargetPath: stagingPath,
      volumeCapability: capability,
      volumeContext,
    });
    const podInfo: Record<string, string> = csiDriver.spec.podInfoOnMount
      ? {
          'csi.storage.k8s.io/pod.name': pod.metadata.name,
          'csi.storage.k8s.io/pod.namespace': ns,
          'csi.storage.k8s.io/pod.uid': pod.metadata.uid!,
          'csi.storage.k8s.io/serviceAccount.name': (pod.spec.serviceAccountName as string | undefined) ?? 'default',
          'csi.storage.k8s.io/ephemeral': 'false',
        }
      : {};
    await this.node.call('nodePublishVolume', {
      volumeId: csi.volumeHandle,
      stagingTargetPath: stagingPath,
      targetPath,
      volumeCapability: capability,
      readonly: false,
      volumeContext: { ...volumeContext, ...podInfo },
    });
    return { pvName, volumeId: csi.volumeHandle, stagingPath, targetPath, capability };
  }

  /** Unpublishes and unstages, then removes the directories kubelet made (which must then be empty). */
  async unpublishBlockVolume(v: PublishedBlockVolume): Promise<void> {
    await this.node.call('nodeUnpublishVolume', { volumeId: v.volumeId, targetPath: v.targetPath });
    fs.rmdirSync(path.dirname(v.targetPath));
    await this.node.call('nodeUnstageVolume', { volumeId: v.volumeId, stagingTargetPath: v.stagingPath });
    fs.rmdirSync(v.stagingPath);
  }

  /**
   * The node part of an expansion csi-resizer left pending (allocatedResourceStatuses: NodeResizePending):
   * NodeExpandVolume on the published volume, then the claim's status as kubelet records it. Resolves
   * with the size the driver reports.
   */
  async finishExpansion(namespace: string, claimName: string, v: PublishedBlockVolume): Promise<number> {
    const { api } = this.cluster;
    const claimPath = `/api/v1/namespaces/${namespace}/persistentvolumeclaims/${claimName}`;
    const pvc = await api.get(claimPath);
    if (pvc.status?.allocatedResourceStatuses?.storage !== 'NodeResizePending')
      throw new Error(`claim ${namespace}/${claimName} has no node expansion pending: ${JSON.stringify(pvc.status)}`);
    const size = pvc.status.allocatedResources.storage as string;
    const answer = await this.node.call('nodeExpandVolume', {
      volumeId: v.volumeId,
      volumePath: v.targetPath,
      stagingTargetPath: v.stagingPath,
      capacityRange: { requiredBytes: BigInt(parseQuantity(size)) },
      volumeCapability: v.capability,
    });
    await api.patch(`${claimPath}/status`, {
      status: {
        capacity: { storage: size },
        allocatedResourceStatuses: { storage: null },
        conditions: ((pvc.status.conditions ?? []) as { type: string }[]).filter(
          (c) => c.type !== 'FileSystemResizePending' && c.type !== 'Resizing',
        ),
      },
    });
    return Number(answer.capacityBytes);
  }

  close(): void {
    this.identity.close();
    this.node.close();
  }
}
