"""What a finished run shows: the HTML report (`html.write_report`) and Grad-CAM maps (`saliency`)."""
