/**
 * What kube-controller-manager's PersistentVolume and PVC-protection controllers do for claims of an
 * external provisioner, done by hand in a headless cluster (there is no controller manager), and nothing
 * more: name the class's provisioner on a new claim, bind the PV csi-provisioner made to its claim, and,
 * once a claim is deleted and no pod uses it, drop its protection finalizer and mark its PV Released
 * (csi-provisioner then deletes the volume and the PV), and drop the PV's protection finalizer once its
 * deletion is asked and no claim is bound to it. Provisioning, snapshots, resizing and deletion in the driver
 * stay the real sidecars' work.
 */
import type { HeadlessCluster } from './headless-cluster.js';
import type { KubeObject } from './kube-api.js';

const claimPath = (ns: string, name: string) => `/api/v1/namespaces/${ns}/persistentvolumeclaims/${name}`;

export class PvControllerStandIn {
  constructor(private readonly cluster: HeadlessCluster) {}

  /** As the PV controller does for an unbound claim whose class has an external provisioner: names it. */
  async nameProvisioner(namespace: string, name: string): Promise<void> {
    const { api } = this.cluster;
    const pvc = await api.get(claimPath(namespace, name));
    const sc = await api.get(`/apis/storage.k8s.io/v1/storageclasses/${pvc.spec.storageClassName}`);
    await api.patch(claimPath(namespace, name), {
      metadata: {
        annotations: {
          'volume.kubernetes.io/storage-provisioner': sc.provisioner,
          'volume.beta.kubernetes.io/storage-provisioner': sc.provisioner,
        },
      },
    });
  }

  /**
   * Waits for the PV the provisioner made for this claim (its claimRef names the claim's UID), then binds
   * them both ways as the PV controller does: PV Bound, claim's volumeName and bind annotations, claim Bound
   * with the PV's capacity and access modes. Resolves with the PV.
   */
  async bindWhenProvisioned(namespace: string, name: string, timeoutMs = 60_000): Promise<KubeObject> {
    const { api } = this.cluster;
    const pvc = await api.get(claimPath(namespace, name));
    const ours = (pv: KubeObject) =>
      pv.spec.claimRef?.uid === pvc.metadata.uid &&
      pv.spec.claimRef?.namespace === namespace &&
      pv.spec.claimRef?.name === name;
    const list = await this.cluster.waitFor(
      '/api/v1/persistentvolumes',
      (l) => ((l?.items ?? []) as KubeObject[]).some(ours),
      `a PV provisioned for claim ${namespace}/${name}`,
      timeoutMs,
    );
    const pv = (list!.items as KubeObject[]).find(ours)!;
    await api.patch(`/api/v1/persistentvolumes/${pv.metadata.name}/status`, { status: { phase: 'Bound' } });
    await api.patch(claimPath(namespace, name), {
      metadata: {
        annotations: { 'pv.kubernetes.io/bind-completed': 'yes', 'pv.kubernetes.io/bound-by-controller': 'yes' },
      },
      spec: { volumeName: pv.metadata.name },
    });
    await api.patch(`${claimPath(namespace, name)}/status`, {
      status: { phase: 'Bound', accessModes: pv.spec.accessModes, capacity: pv.spec.capacity },
    });
    return pv;
  }

  /**
   * For a deleted claim no pod uses any more: the PVC-protection controller removes its finalizer, then the
   * PV controller marks its PV Released. Resolves with the PV's name.
   */
  async releaseDeleted(namespace: string, name: string): Promise<string> {
    const { api } = this.cluster;
    const pvc = await api.get(claimPath(namespace, name));
    if (!pvc.metadata.deletionTimestamp) throw new Error(`claim ${namespace}/${name} is not being deleted`);
    await api.removeFinalizer(claimPath(namespace, name), 'kubernetes.io/pvc-protection');
    await this.cluster.waitFor(claimPath(namespace, name), (o) => o === undefined, `claim ${namespace}/${name} gone`);
    const pvName = pvc.spec.volumeName as string;
    await api.patch(`/api/v1/persistentvolumes/${pvName}/status`, { status: { phase: 'Released' } });
    return pvName;
  }

  /**
   * The PV-protection controller's part: once the PV's deletion is asked (by csi-provisioner, after
   * DeleteVolume) and it is bound to no claim, removes the kubernetes.io/pv-protection finalizer.
   */
  async unprotectDeletedPv(pvName: string, timeoutMs = 60_000): Promise<void> {
    const path = `/api/v1/persistentvolumes/${pvName}`;
    const pv = await this.cluster.waitFor(
      path,
      (o) => o === undefined || Boolean(o.metadata.deletionTimestamp),
      `csi-provisioner to delete PV ${pvName}`,
      timeoutMs,
    );
    if (!pv) return;
    if (pv.status?.phase === 'Bound') throw new Error(`PV ${pvName} is being deleted while Bound`);
    await this.cluster.api.removeFinalizer(path, 'kubernetes.io/pv-protection');
  }
}
