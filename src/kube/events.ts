/**
 * Kubernetes Events for the validation objects, so that `kubectl describe pfv` tells the story of
 * each Module. The objects are cluster-scoped, so their events live in the `default` namespace,
 * as kube-apiserver's own events for cluster-scoped objects do. Events are best effort: a failure
 * to record one is logged and never blocks validation.
 */
import { randomBytes } from 'node:crypto';
import { CoreV1Api, type KubeConfig } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import type { EventRecorder } from '../controller/controller.ts';

const EVENT_NAMESPACE = 'default';
const MAX_MESSAGE = 1024;

export function kubeEventRecorder(kc: KubeConfig, logger: Logger, component = 'kmm-preflight'): EventRecorder {
  const api = kc.makeApiClient(CoreV1Api);
  const host = process.env['HOSTNAME'] ?? '';
  return {
    record(object, type, reason, message) {
      const now = new Date();
      const name = `${object.metadata.name}.${now.getTime().toString(16)}${randomBytes(2).toString('hex')}`;
      void api
        .createNamespacedEvent({
          namespace: EVENT_NAMESPACE,
          body: {
            apiVersion: 'v1',
            kind: 'Event',
            metadata: { name, namespace: EVENT_NAMESPACE },
            involvedObject: {
              apiVersion: object.apiVersion,
              kind: object.kind,
              name: object.metadata.name,
              uid: object.metadata.uid,
              resourceVersion: object.metadata.resourceVersion,
            },
            reason,
            message: message.length > MAX_MESSAGE ? `${message.slice(0, MAX_MESSAGE - 3)}...` : message,
            type,
            source: { component, ...(host ? { host } : {}) },
            firstTimestamp: now,
            lastTimestamp: now,
            count: 1,
            reportingComponent: component,
            reportingInstance: host || component,
          },
        })
        .catch((err: unknown) => logger.warn({ reason, error: (err as Error).message }, 'could not record an event'));
    },
  };
}
