/* depthsite 3D view: a finished job's point cloud (its downsampled .preview.ply) in a canvas to rotate and zoom.
   three.js is vendored under static/vendor/three-0.170.0/ and resolved by the page's import map: no CDN. */
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { PLYLoader } from "three/addons/loaders/PLYLoader.js";

const root = document.getElementById("viewer3d");
const canvas = document.getElementById("viewer3d-canvas");
const message = document.getElementById("viewer3d-message");
let started = false;

function say(text) {
  if (message) { message.textContent = text; }
}

function size() {
  const width = Math.max(320, root.clientWidth || 800);
  return { width, height: Math.round(width * 0.6) };
}

function start(url) {
  if (started || !root || !canvas || !url) { return; }
  started = true;
  root.hidden = false;
  say("Loading the point cloud…");

  let renderer;
  try {
    // preserveDrawingBuffer: a screenshot or a test can read the pixels after a frame.
    renderer = new THREE.WebGLRenderer({ canvas, antialias: true, preserveDrawingBuffer: true });
  } catch (error) {
    say("This browser cannot show 3D (no WebGL); download the .ply and open it in a viewer such as MeshLab.");
    root.setAttribute("data-state", "no-webgl");
    return;
  }
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(0x111418);
  const { width, height } = size();
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  renderer.setSize(width, height, false);
  const camera = new THREE.PerspectiveCamera(50, width / height, 0.01, 1000);
  const controls = new OrbitControls(camera, canvas);
  controls.enableDamping = true;
  controls.zoomSpeed = 1.2;

  // Frames only while something moves (a drag, a scroll, the damping settling, a resize): an open page that
  // nobody touches draws nothing, instead of a frame per display refresh on the CPU or GPU of the visitor.
  // update() applies a share of what is left of the damping at each frame, but says "change" only once the camera
  // has moved a visible step: frames go on for SETTLE_MS after the last such step, to draw the damping's tail (and a
  // drag too slow to make a step per frame) where it ends, as a frame on every refresh would. In time, not frames:
  // a slow renderer (software WebGL) is not kept busy for longer.
  const SETTLE_MS = 1000;
  let framePending = false;
  let lastMove = 0;
  function redraw() {
    if (!framePending) {
      framePending = true;
      window.requestAnimationFrame(draw);
    }
  }
  function wake() {
    lastMove = performance.now();
    redraw();
  }
  function draw() {
    framePending = false;
    if (controls.update()) { lastMove = performance.now(); }
    renderer.render(scene, camera);
    if (performance.now() - lastMove < SETTLE_MS) { redraw(); }
  }
  for (const event of ["start", "change", "end"]) { controls.addEventListener(event, wake); }
  // A lost GPU context comes back blank: draw it again.
  canvas.addEventListener("webglcontextrestored", wake);

  new PLYLoader().load(url, (geometry) => {
    // The file's camera axes are OpenCV's (x right, y down, z forward); three.js looks down -z with y up.
    geometry.rotateX(Math.PI);
    // PLYLoader already reads the photo's sRGB colours into three.js's linear working space.
    const colours = geometry.getAttribute("color");
    geometry.computeBoundingBox();
    const box = geometry.boundingBox;
    const centre = box.getCenter(new THREE.Vector3());
    const extent = box.getSize(new THREE.Vector3());
    const count = geometry.getAttribute("position").count;
    // Points about as wide as the gap between neighbours, so the cloud reads as a surface.
    const spacing = Math.max(extent.x, extent.y) / Math.sqrt(Math.max(count, 1));
    const material = new THREE.PointsMaterial({ size: spacing * 1.6, vertexColors: Boolean(colours),
                                                sizeAttenuation: true });
    scene.add(new THREE.Points(geometry, material));

    // Start where the photo was taken (the origin), looking at the cloud's centre; orbit around that centre.
    camera.position.set(0, 0, 0);
    camera.near = Math.max(extent.z / 1000, 0.001);
    camera.far = extent.z * 20 + 100;
    camera.updateProjectionMatrix();
    controls.target.copy(centre);
    controls.update();
    root.setAttribute("data-points", String(count));
    root.setAttribute("data-state", "ready");
    say("Drag to rotate, scroll to zoom, right-drag to pan. A downsampled preview: the .ply download has a point "
        + "per pixel.");
    wake();
  }, undefined, () => {
    root.setAttribute("data-state", "error");
    say("The point cloud could not be loaded; the .ply download still has it.");
  });

  window.addEventListener("resize", () => {
    const next = size();
    renderer.setSize(next.width, next.height, false);
    camera.aspect = next.width / next.height;
    camera.updateProjectionMatrix();
    wake();
  });
}

if (root) {
  start(root.getAttribute("data-ply-url"));
  // A job that finishes while the page is open: jobs.js announces each state it renders.
  document.addEventListener("depthsite:job-state", (event) => {
    const state = event.detail || {};
    if (state.status === "succeeded" && state.files) { start(state.files.ply_preview); }
  });
}
