/**
 * What the client-side commands (the backup toolkit's and `check`) share about where snapshots are asked:
 * CSI direct, on the driver's socket (--endpoint), or Kubernetes, VolumeSnapshots of a namespace asked through
 * the driver's csi-snapshot-metadata sidecar as the caller's own ServiceAccount (--namespace, --kubeconfig).
 */
import { Option } from 'commander';

/** A failure the user can fix: printed as one line, exit code 2. */
export class UsageError extends Error {}

/** Kubernetes mode: snapshots are VolumeSnapshots of this namespace, reached through the sidecar. */
export function namespaceOption(): Option {
  return new Option(
    '--namespace <ns>',
    "Kubernetes mode: snapshots are VolumeSnapshot names in this namespace, asked through the driver's csi-snapshot-metadata sidecar",
  );
}

export function kubeconfigOption(): Option {
  return new Option(
    '--kubeconfig <file>',
    "with --namespace: the caller's kubeconfig (default $KUBECONFIG, ~/.kube/config, else the pod's ServiceAccount)",
  );
}

/** CSI direct (--endpoint) or Kubernetes (--namespace), not both; throws UsageError otherwise. */
export function oneMode(flags: { endpoint?: string; namespace?: string; kubeconfig?: string }): void {
  if (flags.namespace && flags.endpoint)
    throw new UsageError(
      '--endpoint (CSI direct) and --namespace (Kubernetes, through the sidecar) exclude each other',
    );
  if (flags.kubeconfig && !flags.namespace)
    throw new UsageError('--kubeconfig is for Kubernetes mode: give --namespace too');
}
