/** Small pieces shared by the SVG pictures the tools draw (block maps, benchmark trends). */

/** Text safe inside an SVG element or attribute. */
export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/**
 * The opening of a picture: root element, the `<title>` that screen readers and image viewers announce, and
 * a white background so the picture reads the same on dark pages.
 */
export function svgHeader(width: number, height: number, title: string): string[] {
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12" role="img">`,
    `<title>${escapeXml(title)}</title>`,
    `<rect width="100%" height="100%" fill="#ffffff"/>`,
  ];
}
