/**
 * The Build stage in a cluster: one Kubernetes Job per (validation object, Module) running the
 * builder image (kaniko by default) with the Module's Dockerfile, build arguments, secrets and
 * registry settings, as KMM's own build Jobs do.
 *
 * The Job is the state: its name is derived from the key, its annotations carry the fingerprint of
 * the request, and its conditions are the outcome; a restarted server finds its builds where they
 * were. Running builds are looked at again when the caller asks (the controller requeues them);
 * a Job whose fingerprint differs (a changed Dockerfile or Module) is replaced. A finished Job
 * stays until `release`, so its outcome survives until the caller has recorded it.
 */
import { createHash } from 'node:crypto';
import { BatchV1Api, CoreV1Api, type KubeConfig, type V1Job, type V1Volume, type V1VolumeMount } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { describeKubeError, kubeStatusCode } from '../kube/errors.ts';
import { logTail, type Builder, type BuildOutcome, type BuildRequest } from './types.ts';

export const DEFAULT_BUILDER_IMAGE = 'gcr.io/kaniko-project/executor:v1.23.2';
export const DEFAULT_BUILD_TIMEOUT_MS = 30 * 60_000;

export const LABELS = {
  managedBy: 'app.kubernetes.io/managed-by',
  component: 'app.kubernetes.io/component',
  validation: 'kmm-preflight.sigs.x-k8s.io/validation',
  validationKind: 'kmm-preflight.sigs.x-k8s.io/validation-kind',
  module: 'kmm-preflight.sigs.x-k8s.io/module',
  kernel: 'kmm-preflight.sigs.x-k8s.io/kernel',
} as const;

export const ANNOTATIONS = {
  key: 'kmm-preflight.sigs.x-k8s.io/key',
  fingerprint: 'kmm-preflight.sigs.x-k8s.io/fingerprint',
  kernel: 'kmm-preflight.sigs.x-k8s.io/kernel',
  destination: 'kmm-preflight.sigs.x-k8s.io/destination',
} as const;

const CONTAINER = 'builder';
const WORKSPACE = '/workspace';

export interface JobBuilderOptions {
  readonly kubeConfig: KubeConfig;
  readonly logger: Logger;
  /** The builder image; `build.kanikoParams.tag` replaces its tag. */
  readonly builderImage?: string;
  /** A build not finished after this long is stopped and reported as timed out. */
  readonly timeoutMs?: number;
  readonly now?: () => number;
}

/** `name-hash`: a DNS label (≤ 63) unique per key, readable by its Module's name. */
export function buildJobName(key: string, moduleName: string): string {
  const hash = createHash('sha256').update(key).digest('hex').slice(0, 10);
  const stem = moduleName.toLowerCase().replace(/[^a-z0-9-]/g, '-').replace(/^-+/, '').slice(0, 30).replace(/-+$/, '');
  return `${stem === '' ? 'module' : stem}-build-${hash}`;
}

/** A label value (≤ 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends) that stands for `value`. */
export function labelValue(value: string): string {
  const v = value.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 63);
  return v.replace(/^[^A-Za-z0-9]+/, '').replace(/[^A-Za-z0-9]+$/, '');
}

/** `image` with its tag replaced by `tag` (a digest, if any, is dropped). */
export function withTag(image: string, tag: string): string {
  const at = image.indexOf('@');
  const name = at >= 0 ? image.slice(0, at) : image;
  const slash = name.lastIndexOf('/');
  const colon = name.lastIndexOf(':');
  return `${colon > slash ? name.slice(0, colon) : name}:${tag}`;
}

/** The Job for `req`, field by field as KMM builds its kaniko Jobs. */
export function buildJob(req: BuildRequest, options: { builderImage?: string; timeoutMs?: number } = {}): V1Job {
  const name = buildJobName(req.key, req.moduleName);
  const labels: Record<string, string> = {
    [LABELS.managedBy]: 'kmm-preflight',
    [LABELS.component]: 'build',
    [LABELS.validation]: labelValue(req.owner.name),
    [LABELS.validationKind]: req.owner.kind,
    [LABELS.module]: labelValue(req.moduleName),
    [LABELS.kernel]: labelValue(req.kernel),
  };
  const args = [`--dockerfile=${WORKSPACE}/Dockerfile`, `--context=dir://${WORKSPACE}`, `--destination=${req.destination}`];
  for (const a of req.buildArgs) args.push(`--build-arg=${a.name}=${a.value}`);
  if (!req.push) args.push('--no-push');
  if (req.registryTLS.insecure) args.push('--insecure');
  if (req.registryTLS.insecureSkipTLSVerify) args.push('--skip-tls-verify');
  if (req.baseImageRegistryTLS.insecure) args.push('--insecure-pull');
  if (req.baseImageRegistryTLS.insecureSkipTLSVerify) args.push('--skip-tls-verify-pull');

  const volumes: V1Volume[] = [
    { name: 'dockerfile', configMap: { name: req.dockerfileConfigMap, items: [{ key: 'dockerfile', path: 'Dockerfile' }] } },
  ];
  const mounts: V1VolumeMount[] = [{ name: 'dockerfile', mountPath: WORKSPACE, readOnly: true }];
  if (req.imageRepoSecret) {
    // kaniko reads registry credentials (pull and push) from /kaniko/.docker/config.json.
    volumes.push({ name: 'registry-credentials', secret: { secretName: req.imageRepoSecret, items: [{ key: '.dockerconfigjson', path: 'config.json' }] } });
    mounts.push({ name: 'registry-credentials', mountPath: '/kaniko/.docker', readOnly: true });
  }
  for (const [i, s] of req.secrets.entries()) {
    volumes.push({ name: `secret-${i}`, secret: { secretName: s } });
    mounts.push({ name: `secret-${i}`, mountPath: `/run/secrets/${s}`, readOnly: true });
  }
  const builder = options.builderImage ?? DEFAULT_BUILDER_IMAGE;
  const timeoutMs = options.timeoutMs ?? DEFAULT_BUILD_TIMEOUT_MS;
  return {
    apiVersion: 'batch/v1',
    kind: 'Job',
    metadata: {
      name,
      namespace: req.namespace,
      labels,
      annotations: {
        [ANNOTATIONS.key]: req.key,
        [ANNOTATIONS.fingerprint]: req.fingerprint,
        [ANNOTATIONS.kernel]: req.kernel,
        [ANNOTATIONS.destination]: req.destination,
      },
      ownerReferences: [{ apiVersion: req.owner.apiVersion, kind: req.owner.kind, name: req.owner.name, uid: req.owner.uid, controller: true, blockOwnerDeletion: false }],
    },
    spec: {
      backoffLimit: 0,
      activeDeadlineSeconds: Math.max(1, Math.ceil(timeoutMs / 1000)),
      template: {
        metadata: { labels },
        spec: {
          restartPolicy: 'Never',
          ...(req.selector && Object.keys(req.selector).length > 0 ? { nodeSelector: { ...req.selector } } : {}),
          containers: [
            {
              name: CONTAINER,
              image: req.kanikoTag ? withTag(builder, req.kanikoTag) : builder,
              args,
              volumeMounts: mounts,
            },
          ],
          volumes,
        },
      },
    },
  };
}

interface Known {
  readonly namespace: string;
  readonly name: string;
  fingerprint: string;
  /** A result reached without the Job telling it (a timeout we enforced): kept until release. */
  outcome?: BuildOutcome;
}


function condition(job: V1Job, type: string) {
  return job.status?.conditions?.find((c) => c.type === type && c.status === 'True');
}

function seconds(ms: number): string {
  return ms >= 120_000 ? `${Math.round(ms / 60_000)} min` : `${Math.round(ms / 1000)} s`;
}

export function createJobBuilder(options: JobBuilderOptions): Builder {
  const batch = options.kubeConfig.makeApiClient(BatchV1Api);
  const core = options.kubeConfig.makeApiClient(CoreV1Api);
  const log = options.logger.child({ component: 'job-builder' });
  const now = options.now ?? Date.now;
  const timeoutMs = options.timeoutMs ?? DEFAULT_BUILD_TIMEOUT_MS;
  const known = new Map<string, Known>();

  const remove = async (namespace: string, name: string): Promise<void> => {
    try {
      await batch.deleteNamespacedJob({ name, namespace, propagationPolicy: 'Background' });
      log.info({ namespace, job: name }, 'build Job removed');
    } catch (err) {
      if (kubeStatusCode(err) !== 404) throw err;
    }
  };

  /** The last lines of the build's log, or why they cannot be read. */
  const logOf = async (namespace: string, job: string): Promise<string> => {
    try {
      const pods = await core.listNamespacedPod({ namespace, labelSelector: `job-name=${job}` });
      const pod = [...pods.items].sort((a, b) => String(b.metadata?.creationTimestamp ?? '').localeCompare(String(a.metadata?.creationTimestamp ?? '')))[0];
      if (!pod?.metadata?.name) return 'its Pod is gone, so no build log can be shown';
      const text = await core.readNamespacedPodLog({ name: pod.metadata.name, namespace, container: CONTAINER, tailLines: 20, limitBytes: 16 * 1024 });
      const tail = logTail(String(text));
      return tail === '' ? 'the build log is empty' : `last lines of the build log:\n${tail}`;
    } catch (err) {
      return `its build log could not be read (${describeKubeError(err)})`;
    }
  };

  const create = async (req: BuildRequest, where: string): Promise<BuildOutcome> => {
    try {
      await batch.createNamespacedJob({ namespace: req.namespace, body: buildJob(req, { ...(options.builderImage ? { builderImage: options.builderImage } : {}), timeoutMs }) });
      log.info({ job: where, destination: req.destination, push: req.push }, 'build Job created');
      return { state: 'Running', reason: `build Job ${where} created` };
    } catch (err) {
      if (kubeStatusCode(err) === 409) return { state: 'Running', reason: `build Job ${where} is being replaced` };
      if (kubeStatusCode(err) === 404) {
        return { state: 'Failed', code: 'BuildNamespaceMissing', reason: `the build Job ${where} cannot be created: namespace ${req.namespace} does not exist` };
      }
      if (kubeStatusCode(err) === 403) {
        return { state: 'Failed', code: 'BuildForbidden', reason: `the build Job ${where} cannot be created: ${describeKubeError(err)}; grant kmm-preflight create on jobs in namespace ${req.namespace}` };
      }
      return { state: 'Error', code: 'BuildJobUnavailable', reason: `the build Job ${where} could not be created: ${describeKubeError(err)}` };
    }
  };

  const run = async (req: BuildRequest): Promise<BuildOutcome> => {
    const name = buildJobName(req.key, req.moduleName);
    const where = `${req.namespace}/${name}`;
    let k = known.get(req.key);
    if (k && (k.fingerprint !== req.fingerprint || k.namespace !== req.namespace)) {
      // Another Module version or Dockerfile: the earlier outcome no longer answers.
      known.delete(req.key);
      k = undefined;
    }
    if (k?.outcome) return k.outcome;
    if (!k) known.set(req.key, (k = { namespace: req.namespace, name, fingerprint: req.fingerprint }));

    let job: V1Job;
    try {
      job = await batch.readNamespacedJob({ name, namespace: req.namespace });
    } catch (err) {
      if (kubeStatusCode(err) === 404) return create(req, where);
      return { state: 'Error', code: 'BuildJobUnavailable', reason: `build Job ${where} could not be read: ${describeKubeError(err)}` };
    }
    if (job.metadata?.deletionTimestamp) return { state: 'Running', reason: `build Job ${where} is being replaced` };
    if (job.metadata?.annotations?.[ANNOTATIONS.fingerprint] !== req.fingerprint) {
      log.info({ job: where }, 'the Module or its Dockerfile changed: replacing the build Job');
      await remove(req.namespace, name).catch((err: unknown) => log.warn({ job: where, error: describeKubeError(err) }, 'could not remove an outdated build Job'));
      return { state: 'Running', reason: `build Job ${where} is being replaced: the Module or its Dockerfile changed` };
    }
    if (condition(job, 'Complete')) {
      return req.push
        ? { state: 'Succeeded', image: req.destination, pushed: true, reason: `build Job ${where} built and pushed ${req.destination}` }
        : { state: 'Succeeded', image: req.destination, pushed: false, reason: `build Job ${where} built ${req.destination} (not pushed: pushBuiltImage is false)` };
    }
    const failed = condition(job, 'Failed');
    if (failed) {
      if (failed.reason === 'DeadlineExceeded') {
        return { state: 'Failed', code: 'BuildTimedOut', reason: `build Job ${where} did not finish within ${seconds(timeoutMs)} (${failed.message ?? 'deadline exceeded'})` };
      }
      const why = [failed.reason, failed.message].filter((s) => s && s !== '').join(': ');
      return { state: 'Failed', code: 'BuildFailed', reason: `build Job ${where} failed${why ? ` (${why})` : ''}; ${await logOf(req.namespace, name)}` };
    }
    const started = Date.parse(String(job.status?.startTime ?? job.metadata?.creationTimestamp ?? ''));
    const age = Number.isNaN(started) ? 0 : now() - started;
    if (age > timeoutMs) {
      // The Job controller enforces activeDeadlineSeconds; this catches a Job it never started.
      const tail = await logOf(req.namespace, name);
      k.outcome = { state: 'Failed', code: 'BuildTimedOut', reason: `build Job ${where} did not finish within ${seconds(timeoutMs)}; ${tail}` };
      await remove(req.namespace, name).catch((err: unknown) => log.warn({ job: where, error: describeKubeError(err) }, 'could not remove a timed-out build Job'));
      return k.outcome;
    }
    const active = job.status?.active ?? 0;
    return { state: 'Running', reason: `build Job ${where} ${active > 0 ? 'running' : 'waiting to start'} for ${seconds(age)}` };
  };

  return {
    kind: 'job',
    run,
    async release(key) {
      const k = known.get(key);
      if (!k) return;
      known.delete(key);
      await remove(k.namespace, k.name).catch((err: unknown) => log.warn({ job: `${k.namespace}/${k.name}`, error: describeKubeError(err) }, 'could not remove a build Job'));
    },
    // Job states are read when the caller asks again (the controller polls running builds).
    onUpdate() {},
    async close() {
      known.clear();
    },
  };
}
