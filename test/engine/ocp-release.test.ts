/**
 * OCP release resolution with a fake image file reader (the reading of images from a registry is
 * tested with the Image stage and in the `check` command's tests).
 */
import t from 'tap';
import { ReleaseFileError, resolveReleaseKernel, type ImageFileReader } from '../../src/engine/ocp-release.ts';

const RELEASE = 'registry.local:5000/ocp/release@sha256:' + 'a'.repeat(64);
const DTK = 'registry.local:5000/ocp/dtk@sha256:' + 'b'.repeat(64);

function reader(files: Record<string, Record<string, string | undefined> | undefined>): ImageFileReader {
  return async (image, path) => {
    const content = files[image]?.[path];
    return content === undefined ? undefined : Buffer.from(content);
  };
}

const imageReferences = (dtk: string | undefined) =>
  JSON.stringify({
    kind: 'ImageStream',
    apiVersion: 'image.openshift.io/v1',
    spec: { tags: [{ name: 'cli', from: { kind: 'DockerImage', name: 'quay.io/x/cli@sha256:' + 'c'.repeat(64) } }, ...(dtk ? [{ name: 'driver-toolkit', from: { kind: 'DockerImage', name: dtk } }] : [])] },
  });

const dtkRelease = JSON.stringify({ KERNEL_VERSION: '5.14.0-284.25.1.el9_2.x86_64', RT_KERNEL_VERSION: '5.14.0-284.25.1.rt14.310.el9_2.x86_64', RHEL_VERSION: '9.2' });

t.test('the kernel comes from the driver-toolkit named by the release', async (t) => {
  const files = { [RELEASE]: { 'release-manifests/image-references': imageReferences(DTK) }, [DTK]: { 'etc/driver-toolkit-release.json': dtkRelease } };
  t.same(await resolveReleaseKernel(RELEASE, false, reader(files)), { ok: true, kernel: '5.14.0-284.25.1.el9_2.x86_64', driverToolkitImage: DTK, rt: false });
  t.match(await resolveReleaseKernel(RELEASE, true, reader(files)), { ok: true, kernel: '5.14.0-284.25.1.rt14.310.el9_2.x86_64', rt: true }, 'useRTKernel takes RT_KERNEL_VERSION');
});

t.test('every failure has a reason a person can act on', async (t) => {
  t.match(await resolveReleaseKernel(RELEASE, false, reader({})), { ok: false, code: 'NotAReleaseImage', reason: /is not an OpenShift release image/ });
  t.match(await resolveReleaseKernel(RELEASE, false, reader({ [RELEASE]: { 'release-manifests/image-references': imageReferences(undefined) } })), {
    ok: false,
    code: 'NoDriverToolkit',
    reason: /lists no "driver-toolkit" image/,
  });
  t.match(await resolveReleaseKernel(RELEASE, false, reader({ [RELEASE]: { 'release-manifests/image-references': '{' } })), { code: 'InvalidImageReferences' });
  t.match(await resolveReleaseKernel(RELEASE, false, reader({ [RELEASE]: { 'release-manifests/image-references': imageReferences(DTK) } })), {
    code: 'NoDriverToolkitRelease',
  });
  const noRt = { [RELEASE]: { 'release-manifests/image-references': imageReferences(DTK) }, [DTK]: { 'etc/driver-toolkit-release.json': JSON.stringify({ KERNEL_VERSION: '5.14.0-1.el9' }) } };
  t.match(await resolveReleaseKernel(RELEASE, true, reader(noRt)), { code: 'NoRTKernel', reason: /no real-time kernel; set useRTKernel to false/ });
  const failing: ImageFileReader = async () => {
    throw new ReleaseFileError('Unreachable', 'registry registry.local:5000 is unreachable', true);
  };
  t.match(await resolveReleaseKernel(RELEASE, false, failing), { ok: false, code: 'Unreachable', retriable: true, reason: /release image .*unreachable/ });
});
