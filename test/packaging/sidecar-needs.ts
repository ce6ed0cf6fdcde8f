/**
 * What each sidecar of the chart (and the driver itself, in mode daemonset) needs from the API server, with
 * where that comes from. Each sidecar's
 * roles (<release>-<sidecar>) must hold all of it on their own: test/packaging/chart.test.ts checks the
 * chart's templates against this table, test/ecosystem/helm.test.ts asks a real API server.
 */
/** A need: verbs on a resource, cluster-wide or only in the release's namespace. */
export interface Need {
  group: string;
  resource: string;
  verbs: string[];
  scope: 'cluster' | 'namespace';
}
export const need = (group: string, resource: string, verbs: string[], scope: Need['scope'] = 'cluster'): Need => ({
  group,
  resource,
  verbs,
  scope,
});
const EVENTS = need('', 'events', ['list', 'watch', 'create', 'update', 'patch']);
const LEASES = need(
  'coordination.k8s.io',
  'leases',
  ['get', 'watch', 'list', 'delete', 'update', 'create'],
  'namespace',
);

export const SIDECAR_NEEDS: Record<string, { source: string; needs: Need[] }> = {
  provisioner: {
    // kubernetes-csi/external-provisioner v6.3.0, deploy/kubernetes/rbac.yaml (ClusterRole and Role), plus
    // the VolumeAttributesClass read of pkg/controller/controller.go.
    source: 'external-provisioner v6.3.0 deploy/kubernetes/rbac.yaml + controller.go',
    needs: [
      need('', 'persistentvolumes', ['get', 'list', 'watch', 'create', 'patch', 'delete']),
      need('', 'persistentvolumeclaims', ['get', 'list', 'watch', 'update']),
      need('storage.k8s.io', 'storageclasses', ['get', 'list', 'watch']),
      EVENTS,
      need('snapshot.storage.k8s.io', 'volumesnapshots', ['get', 'list', 'watch', 'update']),
      need('snapshot.storage.k8s.io', 'volumesnapshotcontents', ['get', 'list']),
      need('storage.k8s.io', 'csinodes', ['get', 'list', 'watch']),
      need('', 'nodes', ['get', 'list', 'watch']),
      need('storage.k8s.io', 'volumeattachments', ['get', 'list', 'watch']),
      LEASES,
      need(
        'storage.k8s.io',
        'csistoragecapacities',
        ['get', 'list', 'watch', 'create', 'update', 'patch', 'delete'],
        'namespace',
      ),
      need('', 'pods', ['get'], 'namespace'),
      need('apps', 'replicasets', ['get'], 'namespace'),
      // Not in that rbac.yaml: pkg/controller/controller.go reads the PVC's VolumeAttributesClass (Get) to pass
      // its parameters as CreateVolume mutable_parameters.
      need('storage.k8s.io', 'volumeattributesclasses', ['get']),
    ],
  },
  snapshotter: {
    // kubernetes-csi/external-snapshotter v8.6.0, deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml.
    source: 'external-snapshotter v8.6.0 deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml',
    needs: [
      EVENTS,
      need('snapshot.storage.k8s.io', 'volumesnapshotclasses', ['get', 'list', 'watch']),
      need('snapshot.storage.k8s.io', 'volumesnapshotcontents', ['get', 'list', 'watch', 'update', 'patch']),
      need('snapshot.storage.k8s.io', 'volumesnapshotcontents/status', ['update', 'patch']),
      need('groupsnapshot.storage.k8s.io', 'volumegroupsnapshotclasses', ['get', 'list', 'watch']),
      need('groupsnapshot.storage.k8s.io', 'volumegroupsnapshotcontents', ['get', 'list', 'watch', 'update', 'patch']),
      need('groupsnapshot.storage.k8s.io', 'volumegroupsnapshotcontents/status', ['update', 'patch']),
      LEASES,
    ],
  },
  resizer: {
    // kubernetes-csi/external-resizer v2.3.0 (same as v2.2.1), deploy/kubernetes/rbac.yaml.
    source: 'external-resizer v2.3.0 deploy/kubernetes/rbac.yaml',
    needs: [
      need('', 'persistentvolumes', ['get', 'list', 'watch', 'patch']),
      need('', 'persistentvolumeclaims', ['get', 'list', 'watch']),
      need('', 'pods', ['get', 'list', 'watch']),
      need('', 'persistentvolumeclaims/status', ['patch']),
      EVENTS,
      need('storage.k8s.io', 'volumeattributesclasses', ['get', 'list', 'watch']),
      LEASES,
    ],
  },
  'snapshot-metadata': {
    // kubernetes-csi/external-snapshot-metadata v1.1.0, deploy/snapshot-metadata-cluster-role.yaml, plus
    // the VolumeSnapshotClass get (named class) and list (default class) of every call in
    // pkg/internal/server/grpc/snapshotter_secret.go, which that role lacks.
    source: 'external-snapshot-metadata v1.1.0 deploy/snapshot-metadata-cluster-role.yaml + snapshotter_secret.go',
    needs: [
      need('cbt.storage.k8s.io', 'snapshotmetadataservices', [
        'get',
        'list',
        'watch',
        'create',
        'update',
        'patch',
        'delete',
      ]),
      need('authentication.k8s.io', 'tokenreviews', ['create', 'get']),
      need('authorization.k8s.io', 'subjectaccessreviews', ['create', 'get']),
      need('snapshot.storage.k8s.io', 'volumesnapshots', ['get', 'list']),
      need('snapshot.storage.k8s.io', 'volumesnapshotcontents', ['get', 'list']),
      need('snapshot.storage.k8s.io', 'volumesnapshotclasses', ['get', 'list']),
    ],
  },
  driver: {
    // Mode daemonset: peer discovery lists the plugin pods of its namespace (src/cluster/kubernetes-directory.ts).
    source: 'src/cluster/kubernetes-directory.ts (mode daemonset)',
    needs: [need('', 'pods', ['get', 'list'], 'namespace')],
  },
};
